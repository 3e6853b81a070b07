"""One proposal of a drafter that runs a causal LM (or part of one) with its own KV cache.

Shared by `DraftModel`, `LayerSkip` and `EarlyExit`. Before every proposal the cache keeps the
longest prefix of its tokens that agrees with ``ctx.input_ids`` (always re-feeding the last
committed token, so the root's distribution comes from this proposal's first forward); a chain
or dynamic top-k tree is then grown with `specdec.trees.expand`, one forward per level with a
tree mask. A chain's fed nodes stay cached (they may be accepted); a tree's are dropped. With
`window`, a (re)start on more than `window` committed tokens rebuilds the cache from the last
`window` of them at their true positions.

Boundary: owns no model, cache or state: the drafter passes its forward, cache, the tokens it
holds and its tree knobs, validates them and decides whether to draft. Cache edits go through
`specdec.kv`.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from specdec import kv
from specdec.trees import TokenTree, expand, tree_mask


def check_window(owner: str, window: int | None) -> None:
    """Refuse a `window` that is neither None nor a positive token count."""
    if window is not None and window < 1:
        raise ValueError(f"{owner}: window must be >= 1 or None, got {window}")


# forward(ids [m], positions [m], mask [1, 1, m, slots] additive or None, last_only) ->
# [m, vocab] log-probs ([1, vocab] with last_only), the m tokens' keys/values appended to the cache.
Forward = Callable[[Tensor, Tensor, Tensor | None, bool], Tensor]


def draft(
    forward: Forward,
    cache,
    cached: Tensor,
    ids: Tensor,
    *,
    depth: int,
    topk: int,
    width: int,
    budget: int | None,
    min_confidence: float,
    dtype: torch.dtype,
    cache_length: Callable[[object], int] = kv.length,
    start: int = 0,
    window: int | None = None,
) -> tuple[TokenTree, Tensor, int]:
    """Grow a draft after the committed tokens `ids` ([t], t >= 1) and return it with the tokens
    `cache` holds afterwards ([c], the drafter's next `cached`) and the position of the first of
    them (the next `start`). `cached` ([c]): the tokens whose keys/values `cache` holds now, from
    position `start`. `window`: the most committed tokens fed at once (None: all). `depth`, `topk`,
    `width`, `budget`, `min_confidence`: as
    `specdec.trees.expand` (``width == 1`` is a chain). `dtype`: the tree masks' dtype (the
    model's). `cache_length`: slots `cache` holds (a layer-subset cache asks one of its own
    layers, as `LayerSubset.cached` does)."""
    # Reconcile: keep the cached prefix that still agrees with the committed tokens, and at
    # least one token to feed so the root's distribution comes out of this forward.
    t = ids.numel()
    if start >= t:  # the committed sequence is shorter than where the cache starts: start over
        start, common = 0, 0
    else:  # the cache holds keys/values of cached = ids[start:] as they were; keep what still agrees
        seen = ids[start:]
        same = (cached[: seen.numel()] == seen[: cached.numel()]).long()
        common = min(int(same.cumprod(0).sum()), seen.numel() - 1)
    if window is not None and t - (start + common) > window:
        common, start = 0, t - window  # too much to feed: rebuild from the last `window` tokens
    common = kv.truncate(cache, common)  # fewer if a forward was cut off part-way
    held = t - start  # committed tokens in the cache once the prefix is fed

    def step(tree: TokenTree, frontier: list[int]) -> Tensor:
        if frontier == [-1]:
            return forward(ids[start + common :], torch.arange(start + common, t), None, True)  # [1, vocab]
        rows = torch.tensor(frontier)
        positions = t - 1 + tree.depths()[rows]
        mask = tree_mask(tree, rows, frontier[0], held, dtype)
        return forward(tree.tokens[rows], positions, mask, False)  # [len(frontier), vocab]

    try:
        tree = expand(step, depth=depth, topk=topk, width=width, budget=budget, min_confidence=min_confidence)
    except BaseException:  # cut off (an error, Ctrl-C): keep only what the caller's `cached` still describes
        kv.truncate(cache, common)
        raise
    fed = cache_length(cache) - held  # tree nodes now in the cache (all but the last level)
    # A chain's fed nodes extend the sequence and may be reused next step (those the budget
    # kept); a tree's fed nodes are not one sequence, so they go.
    reuse = min(fed, len(tree)) if width == 1 else 0
    kv.drop_last(cache, fed - reuse)
    return tree, torch.cat([ids[start:], tree.tokens[:reuse]]), start
