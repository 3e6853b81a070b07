"""Dynamic draft trees grown by cumulative draft probability (EAGLE-2).

The model stays outside: the drafter passes `step(tree, frontier) -> log q` as a callable, so
this module remains torch-only. With ``topk = width = 1`` the same growth yields a greedy chain.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from specdec.trees.tree import TokenTree

# step(tree so far, frontier nodes) -> [len(frontier), vocab] draft log-probabilities of the next
# token after each frontier node. The frontier is [-1] (the root) on the first call and otherwise
# the nodes added by the previous call, which are always the newest nodes of `tree`.
StepFn = Callable[[TokenTree, list[int]], Tensor]


def expand(
    step: StepFn,
    *,
    depth: int,
    topk: int,
    width: int | None = None,
    budget: int | None = None,
    keep_probs: bool = False,
) -> TokenTree:
    """Grow `depth` levels: each frontier node offers its top-`topk` tokens, the best `width` of all
    offers by cumulative log-probability become the next frontier; finally keep the `budget` best
    nodes overall. Because log-probabilities are <= 0, a node never outranks its parent (ties go
    to the lower index, the parent), so the kept set is always closed under ancestors.
    """
    width = topk if width is None else width
    if depth < 0 or topk < 1 or width < 1:
        raise ValueError(f"expand: need depth >= 0, topk >= 1, width >= 1 (got {depth}, {topk}, {width})")
    tokens: list[int] = []
    parents: list[int] = []
    scores: list[float] = []
    probs: list[Tensor] = []
    frontier, frontier_scores = [-1], torch.zeros(1, dtype=torch.float64)
    for _ in range(depth):
        logq = step(TokenTree(torch.tensor(tokens, dtype=torch.long), torch.tensor(parents, dtype=torch.long)), frontier)
        top_lq, top_tok = logq.topk(min(topk, logq.shape[-1]), dim=-1)  # [f, topk]
        cand = (frontier_scores[:, None] + top_lq.double()).flatten()  # [f * topk]
        best = cand.topk(min(width, cand.numel())).indices
        k = top_tok.shape[1]
        new_frontier = []
        for b in best.tolist():
            new_frontier.append(len(tokens))
            parents.append(frontier[b // k])
            tokens.append(int(top_tok.flatten()[b]))
            scores.append(float(cand[b]))
            if keep_probs:
                probs.append(logq[b // k].float().exp())
        frontier, frontier_scores = new_frontier, cand[best]
    tree = TokenTree(
        torch.tensor(tokens, dtype=torch.long),
        torch.tensor(parents, dtype=torch.long),
        torch.stack(probs) if keep_probs and probs else None,
    )
    if budget is not None and budget < len(tree):
        order = sorted(range(len(tokens)), key=lambda i: (-scores[i], i))
        tree = tree.subtree(order[:budget])
    return tree
