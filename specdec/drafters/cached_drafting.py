"""One proposal of a drafter that runs a causal LM (or part of one) with its own KV cache.

Shared by `DraftModel`, `LayerSkip` and `EarlyExit`. Before every proposal the cache keeps the
longest prefix of its tokens that agrees with ``ctx.input_ids`` (always re-feeding the last
committed token, so the root's distribution comes from this proposal's first forward); a chain
or dynamic top-k tree is then grown with `specdec.trees.expand`, one forward per level with a
tree mask. A chain's fed nodes stay cached (they may be accepted); a tree's are dropped. With
`window`, a (re)start on more than `window` committed tokens rebuilds the cache from the last
`window` of them at their true positions. With a `guess` (multi-level drafting), a chain's
forwards also feed the tokens the guess expects next, and every guess the model itself would have
drafted comes out of the same forward: the same greedy chain in fewer forwards.

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
# guess(seq [s]) -> [g] tokens expected to follow seq (g may be 0)
Guess = Callable[[Tensor], Tensor]


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
    guess: Guess | None = None,
) -> tuple[TokenTree, Tensor, int]:
    """Grow a draft after the committed tokens `ids` ([t], t >= 1) and return it with the tokens
    `cache` holds afterwards ([c], the drafter's next `cached`) and the position of the first of
    them (the next `start`). `cached` ([c]): the tokens whose keys/values `cache` holds now, from
    position `start`. `window`: the most committed tokens fed at once (None: all). `depth`, `topk`,
    `width`, `budget`, `min_confidence`: as
    `specdec.trees.expand` (``width == 1`` is a chain). `dtype`: the tree masks' dtype (the
    model's). `cache_length`: slots `cache` holds (a layer-subset cache asks one of its own
    layers, as `LayerSubset.cached` does). `guess`: multi-level drafting of a chain (``topk ==
    width == 1``), see `_guessed_chain`."""
    if guess is not None and (topk != 1 or width != 1):
        raise ValueError(f"draft: a guess speeds up a chain only (topk = width = 1), got topk={topk}, width={width}")
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
        if guess is None:
            tree = expand(step, depth=depth, topk=topk, width=width, budget=budget, min_confidence=min_confidence)
        else:
            tree = _guessed_chain(forward, cache, ids, start + common, depth, min_confidence, guess)
            tree = tree.subtree(range(budget)) if budget is not None and budget < len(tree) else tree
    except BaseException:  # cut off (an error, Ctrl-C): keep only what the caller's `cached` still describes
        kv.truncate(cache, common)
        raise
    fed = cache_length(cache) - held  # tree nodes now in the cache (all but the last level)
    # A chain's fed nodes extend the sequence and may be reused next step (those the budget
    # kept); a tree's fed nodes are not one sequence, so they go.
    reuse = min(fed, len(tree)) if width == 1 else 0
    kv.drop_last(cache, fed - reuse)
    return tree, torch.cat([ids[start:], tree.tokens[:reuse]]), start


_GUESS_AFTER = 8  # pending tokens beyond this (a prompt, a new turn) are fed without guesses


def _guessed_chain(
    forward: Forward, cache, ids: Tensor, fed: int, depth: int, min_confidence: float, guess: Guess
) -> TokenTree:
    """The greedy chain `expand` grows with ``topk = width = 1`` (up to rounding: rows share a
    forward), in fewer forwards. Each forward feeds the pending tokens (at first ``ids[fed:]``, then
    the newest chain token) followed by the tokens `guess` expects after the chain so far; row i's
    best token joins the chain, and the next row counts only while the guess before it matched.
    Guesses that did not match leave `cache` again; the last chain token stays unfed, as in
    `expand`. Scores are cumulative draft probabilities."""
    t = ids.numel()
    tokens: list[int] = []
    scores: list[float] = []
    total = 0.0  # cumulative log-probability of the chain so far
    pending = ids[fed:]
    while len(tokens) < depth:
        room = depth - len(tokens) - 1 if pending.numel() <= _GUESS_AFTER else 0  # a (re)start feeds alone
        guessed = torch.zeros(0, dtype=torch.long)  # [g]: room for one token past them
        if room:
            guessed = guess(torch.cat([ids, torch.tensor(tokens, dtype=torch.long)]))[:room].to(torch.long)
        feed = torch.cat([pending, guessed])
        first = t + len(tokens) - pending.numel()  # position of feed[0]
        last_only = not guessed.numel()  # else only the guesses' rows and the one before them count
        logq = forward(feed, torch.arange(first, first + feed.numel()), None, last_only)[-(guessed.numel() + 1):]
        top_lq, top_tok = (x.cpu() for x in logq.max(dim=-1))  # [g + 1] each: one wait per forward
        new, confident = 0, True
        for i in range(guessed.numel() + 1):
            if min_confidence > 0 and float(top_lq[i].exp()) < min_confidence:
                confident = False  # `expand` stops growing here too
                break
            tokens.append(int(top_tok[i]))
            total += float(top_lq[i])
            scores.append(total)
            new += 1
            if i == guessed.numel() or int(top_tok[i]) != int(guessed[i]):
                break
        kv.drop_last(cache, guessed.numel() - max(new - 1, 0))  # fed guesses that are not chain tokens
        if not confident:
            break
        pending = torch.tensor(tokens[-1:], dtype=torch.long)
    return TokenTree(torch.tensor(tokens, dtype=torch.long), torch.arange(len(tokens)) - 1,
                     scores=torch.tensor(scores, dtype=torch.float64).exp())
