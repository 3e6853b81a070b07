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
    min_confidence: float = 0.0,
    min_score: float = 0.0,
    vocab: Tensor | None = None,
) -> TokenTree:
    """Grow `depth` levels: each frontier node offers its top-`topk` tokens, the best `width` of all
    offers by cumulative log-probability become the next frontier; keep the `budget` best nodes.
    Log-probabilities are <= 0, so a node never outranks its parent (ties go to the parent) and
    the kept set is closed under ancestors. The tree carries no `draft_probs` (top-k children are
    deterministic). Growth stops when no frontier node's best token reaches `min_confidence`, or
    no node of the newest level reaches cumulative probability `min_score` (that level is kept).
    `vocab` ([V] host token ids): `step` scores only those tokens, column j being ``vocab[j]``.
    `step` may return log-probabilities on any device; only each level's [f, topk] values and
    ids come to the host.
    """
    width = topk if width is None else width
    if depth < 0 or topk < 1 or width < 1:
        raise ValueError(f"expand: need depth >= 0, topk >= 1, width >= 1 (got {depth}, {topk}, {width})")
    if not min_score >= 0:  # NaN too
        raise ValueError(f"expand: min_score must be >= 0 (0: no bar), got {min_score}")
    tokens: list[int] = []
    parents: list[int] = []
    scores: list[float] = []
    frontier, frontier_scores = [-1], torch.zeros(1, dtype=torch.float64)
    for _ in range(depth):
        logq = step(
            TokenTree(torch.tensor(tokens, dtype=torch.long), torch.tensor(parents, dtype=torch.long)), frontier
        )
        if vocab is not None and logq.shape[-1] != vocab.numel():
            raise ValueError(f"expand: step scored {logq.shape[-1]} tokens but vocab names {vocab.numel()}")
        top_lq, top_tok = logq.topk(min(topk, logq.shape[-1]), dim=-1)  # [f, topk]
        top_lq, top_tok = top_lq.cpu(), top_tok.cpu()  # the level's one wait for the device
        if vocab is not None:
            top_tok = vocab[top_tok]  # draft-vocabulary columns -> token ids
        if min_confidence > 0 and float(top_lq[:, 0].max().exp()) < min_confidence:
            break
        cand = (frontier_scores[:, None] + top_lq.double()).flatten()  # [f * topk]
        best = cand.topk(min(width, cand.numel())).indices
        k = top_tok.shape[1]
        new_frontier = []
        for b in best.tolist():
            new_frontier.append(len(tokens))
            parents.append(frontier[b // k])
            tokens.append(int(top_tok.flatten()[b]))
            scores.append(float(cand[b]))
        frontier, frontier_scores = new_frontier, cand[best]
        if min_score > 0 and float(frontier_scores.max().exp()) < min_score:
            break
    tree = TokenTree(
        torch.tensor(tokens, dtype=torch.long),
        torch.tensor(parents, dtype=torch.long),
        scores=torch.tensor(scores, dtype=torch.float64).exp(),  # cumulative draft probability
    )
    if budget is not None and budget < len(tree):
        order = sorted(range(len(tokens)), key=lambda i: (-scores[i], i))
        tree = tree.subtree(order[:budget])
    return tree
