"""Static tree shapes: the list-of-paths format and the hardware-aware optimal shape (Sequoia).

A shape is a list of paths of candidate ranks, as Medusa, EAGLE and vLLM write trees: ``(0,)``
is the top candidate at depth 1, ``(0, 1)`` the second candidate at depth 2 under it.
`optimal_shape` takes ``accept[d][r]``, the chance that the rank-r candidate at depth d + 1 is
accepted given its parent was; a node's chance is the product along its path, which only falls,
so the best n-node shape is the n best paths (added greedily), and n follows the sizing rule
over `verify_cost` (`specdec.trees.sizing`).

Boundary: torch only, no models.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from specdec.trees.sizing import LinearCost, best_size
from specdec.trees.tree import TokenTree

Path = tuple[int, ...]


def parents_of(paths: Sequence[Path]) -> list[int]:
    """Parent index of each path in `paths` (-1 for depth 1). Every path's prefix must come
    earlier in the list, as in a topological order."""
    index: dict[Path, int] = {}
    parents = []
    for i, path in enumerate(paths):
        if not path:
            raise ValueError("a tree path must be non-empty (the root is implicit)")
        prefix = tuple(path[:-1])
        if prefix and prefix not in index:
            raise ValueError(f"path {tuple(path)} comes before its parent {prefix}: list paths parents-first")
        parents.append(index[prefix] if prefix else -1)
        index[tuple(path)] = i
    return parents


def fill(paths: Sequence[Path], candidates: Sequence[Sequence[int]] | Tensor) -> TokenTree:
    """A token tree from a shape and ranked candidates per depth (``candidates[d][r]``). Nodes
    whose tokens repeat a sibling's are kept (they cost a slot but change nothing)."""
    tokens = [int(candidates[len(p) - 1][p[-1]]) for p in paths]
    return TokenTree(torch.tensor(tokens, dtype=torch.long), torch.tensor(parents_of(paths), dtype=torch.long))


@dataclass(frozen=True)
class Shape:
    paths: list[Path]  # parents-first
    expected_tokens: float  # per target forward: 1 + sum of path acceptance chances
    cost: float  # verify cost of the shape relative to a forward over the root alone

    @property
    def tokens_per_cost(self) -> float:
        return self.expected_tokens / self.cost


def best_paths(accept: Tensor, budget: int) -> list[tuple[float, Path]]:
    """The `budget` paths with the highest acceptance chance, best first (so parents-first)."""
    depth, ranks = accept.shape
    heap = [(-float(accept[0, r]), (r,)) for r in range(ranks)]
    heapq.heapify(heap)
    chosen: list[tuple[float, Path]] = []
    while heap and len(chosen) < budget:
        neg, path = heapq.heappop(heap)
        if -neg <= 0:
            break
        chosen.append((-neg, path))
        if len(path) < depth:
            for r in range(ranks):
                heapq.heappush(heap, (neg * float(accept[len(path), r]), path + (r,)))
    return chosen


def optimal_shape(accept: Tensor, max_nodes: int, verify_cost: Callable[[int], float] | None = None) -> Shape:
    """The shape with the most expected tokens per unit of verify time, of at most `max_nodes`
    nodes (`verify_cost` None: the largest useful shape, as on hardware where it is free)."""
    accept = torch.as_tensor(accept, dtype=torch.float64)
    if accept.dim() != 2 or bool(((accept < 0) | (accept > 1)).any()) or bool((accept.sum(-1) > 1 + 1e-9).any()):
        raise ValueError("accept must be [depth, ranks] chances in [0, 1], each depth's row summing to at most 1")
    if max_nodes < 0:
        raise ValueError(f"max_nodes must be >= 0, got {max_nodes}")
    paths = best_paths(accept, max_nodes)
    size = best_size([chance for chance, _ in paths], verify_cost or LinearCost(0.0))
    return Shape([p for _, p in paths[: size.n]], size.expected, size.cost)
