"""`merge`: the union of several drafters' token trees as one trie, cut to a node budget.

A node is identified by its token path from the root, so prefixes that several trees share
appear once. Each merged node carries a score (the estimate that it ends up on the accepted
path): the best score any input gave that path, clamped to at most its parent's. The clamp makes
the ranking ancestor-closed (a node never outranks its parent, and ties go to the earlier index,
which the parent always has), so keeping the `budget` best nodes keeps a valid tree.

Boundary: torch only. Nothing here knows which drafter built a tree or what the scores mean
beyond "higher is more likely accepted".
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from specdec.trees.tree import TokenTree


def merge(
    trees: Sequence[TokenTree], scores: Sequence[Tensor], budget: int | None = None
) -> tuple[TokenTree, list[Tensor]]:
    """Merge `trees` (``scores[j]``: [len(trees[j])], one score per node) into one trie.

    Returns the merged tree (nodes in first-seen order: the first tree's nodes, then each later
    tree's new paths; `scores` set to the clamped merged scores, float64; `draft_probs` None,
    since one node may come from several proposals) and, per input tree, an int64 map
    [len(trees[j])] from its nodes to merged indices, -1 where the budget dropped the node.
    ``budget`` None keeps every node; otherwise the `budget` best by (score desc, index asc).
    """
    if len(trees) != len(scores):
        raise ValueError(f"merge: got {len(trees)} trees but {len(scores)} score tensors; pass one per tree")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 0):
        raise ValueError(f"merge: budget must be None (keep all) or an int >= 0, got {budget!r}")
    tokens: list[int] = []
    parents: list[int] = []
    best: list[float] = []
    node_of: dict[tuple[int, int], int] = {}  # (merged parent, token) -> merged node
    maps: list[list[int]] = []
    for j, (tree, score) in enumerate(zip(trees, scores)):
        if score is None or torch.as_tensor(score).numel() != len(tree):
            got = "None" if score is None else f"{torch.as_tensor(score).numel()} entries"
            raise ValueError(f"merge: scores[{j}] is {got} for a tree of {len(tree)} nodes; give one score per node")
        values = torch.as_tensor(score).double().reshape(-1).tolist()
        if any(math.isnan(v) for v in values):
            raise ValueError(f"merge: scores[{j}] contains NaN; scores must be comparable numbers")
        mapped: list[int] = []
        for tok, par, value in zip(tree.tokens.tolist(), tree.parents.tolist(), values):
            key = (mapped[par] if par >= 0 else -1, tok)
            node = node_of.get(key)
            if node is None:
                node = node_of[key] = len(tokens)
                tokens.append(tok)
                parents.append(key[0])
                best.append(value)
            elif value > best[node]:
                best[node] = value
            mapped.append(node)
        maps.append(mapped)
    # Parents precede children in first-seen order, so one pass clamps against final parent scores.
    for i, p in enumerate(parents):
        if p >= 0 and best[i] > best[p]:
            best[i] = best[p]
    n = len(tokens)
    if budget is None or budget >= n:
        keep = list(range(n))
    else:
        keep = sorted(sorted(range(n), key=lambda i: (-best[i], i))[:budget])
    new_index = [-1] * n
    for new, old in enumerate(keep):
        new_index[old] = new
    merged = TokenTree(
        torch.tensor([tokens[i] for i in keep], dtype=torch.long),
        torch.tensor([new_index[parents[i]] if parents[i] >= 0 else -1 for i in keep], dtype=torch.long),
        scores=torch.tensor([best[i] for i in keep], dtype=torch.float64),
    )
    return merged, [torch.tensor([new_index[m] for m in mapped], dtype=torch.long) for mapped in maps]
