"""Optional dependencies: `require(module, extra)` imports a module that only an extra installs.

A missing one is an ImportError naming the extra to install (``pip install 'specdec[bench]'``),
which the CLI prints as its one error line. The core dependencies are imported directly.
"""

from __future__ import annotations

import importlib
from types import ModuleType

EXTRAS = {"bench": "plots", "train": "training", "demo": "the demo page"}  # extra -> what it is for


def require(module: str, extra: str) -> ModuleType:
    """`module`, imported; or an ImportError that names `extra` and the command installing it."""
    if extra not in EXTRAS:
        raise ValueError(f"require: unknown extra {extra!r}; the extras are {', '.join(EXTRAS)}")
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"{module} is not installed ({EXTRAS[extra]} need it): pip install 'specdec[{extra}]'"
                          f" ({err})") from err
