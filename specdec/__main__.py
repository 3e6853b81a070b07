"""`python -m specdec ...` is the `specdec` command (works before a shell rehash picks up the script)."""

import sys

from specdec.cli import main

sys.exit(main())
