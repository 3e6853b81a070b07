"""Static tree shapes: the paths format and the acceptance- and cost-aware optimal shape."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from specdec.trees import fill, optimal_shape, parents_of
from specdec.trees.static import best_paths


def test_paths_format_round_trip():
    paths = [(0,), (1,), (0, 0), (0, 1), (0, 0, 0)]
    assert parents_of(paths) == [-1, -1, 0, 0, 2]
    tree = fill(paths, [[5, 6], [7, 8], [9, 10]])
    assert tree.tokens.tolist() == [5, 6, 7, 8, 9] and tree.parents.tolist() == [-1, -1, 0, 0, 2]
    with pytest.raises(ValueError, match="parents-first"):
        parents_of([(0, 0), (0,)])


def test_best_paths_by_product_of_chances():
    accept = torch.tensor([[0.6, 0.2], [0.5, 0.3]])
    assert [p for _, p in best_paths(accept, 4)] == [(0,), (0, 0), (1,), (0, 1)]


def all_closed_sets(depth: int, ranks: int, n: int):
    nodes = [p for d in range(1, depth + 1) for p in itertools.product(range(ranks), repeat=d)]
    for subset in itertools.combinations(nodes, n):
        chosen = set(subset)
        if all(len(p) == 1 or p[:-1] in chosen for p in chosen):
            yield chosen


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 6))
def test_greedy_shape_is_optimal_by_brute_force(seed, n):
    g = torch.Generator().manual_seed(seed)
    raw = torch.rand(3, 2, generator=g, dtype=torch.float64)
    accept = raw / raw.sum(-1, keepdim=True) * torch.rand(3, 1, generator=g, dtype=torch.float64)  # rows sum <= 1

    def value(paths):
        return sum(float(torch.prod(torch.stack([accept[d, r] for d, r in enumerate(p)]))) for p in paths)

    best = max(value(s) for s in all_closed_sets(3, 2, n))
    shape = optimal_shape(accept, n)
    assert len(shape.paths) == n and shape.expected_tokens - 1 == pytest.approx(best, abs=1e-9)
    assert len(parents_of(shape.paths)) == n  # parents-first, or it raises


def test_a_flat_cost_curve_buys_a_bigger_tree():
    accept = torch.tensor([[0.5, 0.2, 0.1], [0.5, 0.2, 0.1], [0.5, 0.2, 0.1], [0.5, 0.2, 0.1]])
    free = optimal_shape(accept, 32)
    flat = optimal_shape(accept, 32, lambda n: 1.0 + 0.01 * n)
    steep = optimal_shape(accept, 32, lambda n: 1.0 + 0.3 * n)
    assert len(free.paths) == 32 and len(steep.paths) < len(flat.paths) <= 32
    assert steep.tokens_per_cost >= 1.0 and flat.expected_tokens > steep.expected_tokens
    with pytest.raises(ValueError, match="accept"):
        optimal_shape(torch.tensor([[0.9, 0.5]]), 4)
