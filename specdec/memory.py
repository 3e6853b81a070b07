"""Memory for copies of model weights, checked before they are made.

Packed linears, a draft vocabulary's lm_head rows and a Medusa-2 target's merged copy each
duplicate weights; where they do not fit, the kernel would kill the process without a word. Each
copy first asks `fits` with the bytes it is about to allocate, then either skips itself with a
warning (packing: the stock forward is exact, only slower) or raises `NotEnoughMemoryError`
(`require`). Only host memory is checked; GPU copies are the GPU allocator's to refuse.
`peak_rss` reports what the process used at most (`GenerationStats.peak_rss_bytes`).

Boundary: the standard library; Linux's ``MemAvailable`` (elsewhere nothing is refused).
"""

from __future__ import annotations

import sys

HEADROOM = 256 << 20  # bytes left free besides the copy: activations, caches, the allocator's slack


class NotEnoughMemoryError(RuntimeError):
    """A required copy of weights does not fit in the memory available."""


def available() -> int | None:
    """Bytes the kernel can hand out without swapping (``MemAvailable``), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_rss() -> int:
    """The process's peak resident set size in bytes so far (0 where the platform does not say)."""
    try:
        import resource
    except ImportError:  # not Unix
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS counts bytes, Linux KiB


def size(n: int) -> str:
    """`n` bytes for a message: ``12.0 KiB``, ``512.0 MiB``, ``1.3 GiB``."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 2**10:.1f} KiB"


def fits(needed: int) -> tuple[bool, int | None]:
    """(whether `needed` more bytes, plus `HEADROOM`, fit in the memory available; that memory)."""
    free = available()
    return free is None or needed + HEADROOM <= free, free


def require(needed: int, what: str, fix: str) -> None:
    """Raise `NotEnoughMemoryError` unless `needed` bytes fit: "`what` needs ..., `fix`"."""
    ok, free = fits(needed)
    if not ok:
        raise NotEnoughMemoryError(f"{what} needs {size(needed)} of memory (and {size(HEADROOM)} to spare) but "
                                   f"{size(free)} is available; {fix}")
