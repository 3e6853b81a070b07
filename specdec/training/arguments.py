"""Checks the training commands share, run on their arguments before any long work (loading a
model, generating, training) and before anything is written: each failure is a ValueError that
names the argument (as its ``--flag``) and the fix, which ``specdec train`` prints as one line.

Boundary: the standard library and torch; no model, no data.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

DTYPES = ("float32", "bfloat16", "float16")


def dtype(name: str, flag: str = "--dtype") -> torch.dtype:
    """The torch dtype called `name`, one of `DTYPES`."""
    if name not in DTYPES:
        raise ValueError(f"{flag} must be one of {', '.join(DTYPES)}, got {name!r}")
    return getattr(torch, name)


def at_least_one(**values: int | None) -> None:
    """Refuse any value below 1, named as its flag (``max_steps`` -> ``--max-steps``); None is unset."""
    for name, value in values.items():
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def output_dir(path: str | Path, flag: str = "--output-dir") -> Path:
    """`path` as a directory a command may create and fill: refused when it, or the nearest
    existing directory above it, is a file or cannot be written."""
    path = Path(path)
    for existing in (path, *path.absolute().parents):
        if existing.exists():
            if not existing.is_dir():
                where = "" if existing == path else f": {str(existing)!r}"
                raise ValueError(f"{flag} {str(path)!r}{where} is not a directory; choose a directory")
            if not os.access(existing, os.W_OK | os.X_OK):
                raise ValueError(f"{flag} {str(path)!r}: {str(existing)!r} is not writable; choose another place")
            break
    return path


def output_file(path: str | Path, flag: str = "--output") -> Path:
    """`path` as a file a command may write: refused when it is a directory or its directory
    cannot be made (`output_dir`)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{flag} {str(path)!r} is a directory; give a file name")
    output_dir(path.parent, f"{flag} {str(path)!r}: its folder")
    return path
