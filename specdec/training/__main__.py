"""``python -m specdec.training <command> ...`` (and ``accelerate launch -m specdec.training ...``)."""

import sys

from specdec.training.cli import main

sys.exit(main())
