"""Static tree presets in the list-of-paths format, and Medusa's calibrated sparse tree.

A preset is a shape (`specdec.trees.static`): paths of candidate ranks, parents-first, so every
prefix of the list is a tree. The published trees (tuned for 7B models on GPUs) also come cut to
smaller sizes for CPUs, where a wide verify is dear. `calibrated(accuracy, budget)` rebuilds such
a tree from a drafter's own per-depth, per-rank accuracy (`specdec.trees.static.optimal_shape`).

Boundary: torch and the standard library only; no models.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor

from specdec.trees.static import Path, optimal_shape, parents_of

# Medusa's `mc_sim_7b_63` (FasterDecoding/Medusa, medusa/model/medusa_choices.py), in its
# published greedy order: depth <= 4, ranks <= 9 (top-10 per head).
MEDUSA_63: list[Path] = [
    (0,), (0, 0), (1,), (0, 1), (2,), (0, 0, 0), (1, 0), (0, 2), (3,), (0, 3), (4,), (0, 4), (2, 0), (0, 5),
    (0, 0, 1), (5,), (0, 6), (6,), (0, 7), (0, 1, 0), (1, 1), (7,), (0, 8), (0, 0, 2), (3, 0), (0, 9), (8,),
    (9,), (1, 0, 0), (0, 2, 0), (1, 2), (0, 0, 3), (4, 0), (2, 1), (0, 0, 4), (0, 0, 5), (0, 0, 0, 0),
    (0, 1, 1), (0, 0, 6), (0, 3, 0), (5, 0), (1, 3), (0, 0, 7), (0, 0, 8), (0, 0, 9), (6, 0), (0, 4, 0),
    (1, 4), (7, 0), (0, 1, 2), (2, 0, 0), (3, 1), (2, 2), (8, 0), (0, 5, 0), (1, 5), (1, 0, 1), (0, 2, 1),
    (9, 0), (0, 6, 0), (0, 0, 0, 1), (1, 6), (0, 7, 0),
]  # fmt: skip

# EAGLE's default tree (SafeAILab/EAGLE, model/choices.py, also named mc_sim_7b_63): 25 nodes,
# depth 5, top-4; deeper and narrower than Medusa's, for a drafter that conditions on its path.
EAGLE_25: list[Path] = [
    (0,), (1,), (2,), (3,), (0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (2, 0), (2, 1), (3, 0), (0, 0, 0),
    (0, 0, 1), (0, 0, 2), (0, 1, 0), (0, 1, 1), (0, 2, 0), (0, 2, 1), (1, 0, 0), (0, 0, 0, 0), (0, 0, 0, 1),
    (0, 0, 0, 2), (0, 0, 0, 0, 0), (0, 0, 0, 0, 1),
]  # fmt: skip


def chain(depth: int) -> list[Path]:
    """The top candidate at every depth: ``[(0,), (0, 0), ...]``."""
    return [(0,) * d for d in range(1, depth + 1)]


PRESETS: dict[str, list[Path]] = {
    "medusa-63": MEDUSA_63,
    "medusa-32": MEDUSA_63[:32],
    "medusa-16": MEDUSA_63[:16],
    "medusa-8": MEDUSA_63[:8],
    "eagle-25": EAGLE_25,
    "chain-3": chain(3),
    "chain-5": chain(5),
}


def preset(name: str) -> list[Path]:
    """A copy of the named preset; ValueError listing the names for an unknown one."""
    if name not in PRESETS:
        raise ValueError(f"tree={name!r} is not a tree preset; choose one of {sorted(PRESETS)} or pass a list of paths")
    return list(PRESETS[name])


def cut(paths: Sequence[Path], max_depth: int) -> list[Path]:
    """The paths no deeper than `max_depth` (still parents-first: a path's prefixes are shallower)."""
    return [tuple(p) for p in paths if len(p) <= max_depth]


def validate(paths: Sequence[Path], *, max_depth: int | None = None, max_rank: int | None = None) -> list[Path]:
    """`paths` as tuples, checked: parents-first, no duplicates, within the drafter's depth and ranks."""
    paths = [tuple(int(r) for r in p) for p in paths]
    parents_of(paths)  # raises for an empty path or a child listed before its parent
    if len(set(paths)) != len(paths):
        raise ValueError("tree: a path is listed twice")
    if any(r < 0 for p in paths for r in p):
        raise ValueError("tree: ranks must be >= 0")
    deepest = max((len(p) for p in paths), default=0)
    if max_depth is not None and deepest > max_depth:
        raise ValueError(f"tree: paths reach depth {deepest} but the drafter predicts only {max_depth} tokens ahead; "
                         f"drop the deeper paths (specdec.trees.presets.cut(paths, {max_depth}))")
    top = max((r for p in paths for r in p), default=0)
    if max_rank is not None and top > max_rank:
        raise ValueError(f"tree: a path uses rank {top} but at most rank {max_rank} is available")
    return paths


def calibrated(accuracy: Tensor, budget: int, verify_cost: Callable[[int], float] | None = None) -> list[Path]:
    """Medusa's sparse tree from measured accuracy: ``accuracy[d][r]`` is the chance that the
    rank-r candidate at depth d + 1 is the right token given the path above it was right. Paths
    are added best-first by expected gain (the product of chances along the path) until
    `budget` nodes, or until the gain per unit of `verify_cost` stops growing when a cost
    curve is given (`specdec.Context.verify_cost`)."""
    return optimal_shape(accuracy, budget, verify_cost).paths
