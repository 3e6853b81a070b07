"""Prompt lookup: copy what followed the latest earlier occurrence of the context's last n-gram.

Training-free and model-free; the search runs over prompt + generated text (numpy). With
``num_matches > 1`` the continuations of several distinct matches merge into one trie. The
draft length L is chosen per step: for each n-gram size a running estimate `a` of a copied
token's acceptance gives L maximising ``(1 + a + ... + a^L) / cost(L)`` (`specdec.trees.sizing`),
cost being `Context.verify_cost` or ``1 + token_cost * L``; ``token_cost = 0`` always drafts
`num_tokens`, like HF's ``prompt_lookup_num_tokens``.

Boundary: model-free; reads only `Context`/`Feedback`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from specdec.drafter import Context, Feedback
from specdec.trees import LinearCost, RunningRate, TokenTree, best_size


@dataclass
class PromptLookup:
    num_tokens: int = 10  # longest continuation copied from one match (HF's prompt_lookup_num_tokens)
    max_ngram: int = 3  # longest suffix searched for; shorter ones are tried if it does not occur
    min_ngram: int = 1
    num_matches: int = 1  # 1 = a chain; more = a tree of distinct continuations
    budget: int | None = None  # most tree nodes; None = num_tokens * num_matches
    # Extra verify cost of one more draft token, relative to a one-token forward. None: the
    # curve the core hands over (Context.verify_cost). A number overrides the curve; 0 disables
    # the adaptive length.
    token_cost: float | None = None
    # Per n-gram size: accepted copies per trial, decayed so the estimate follows the text.
    stats: dict[int, RunningRate] = field(default_factory=dict, repr=False)

    needs_hidden_states = False
    _DECAY = 0.95
    _PRIOR = (1.0, 2.0)  # [accepted, trials]: a = 0.5, weak

    def __post_init__(self) -> None:
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError(f"PromptLookup: need 1 <= min_ngram <= max_ngram, got {self.min_ngram}, {self.max_ngram}")
        if self.num_tokens < 1 or self.num_matches < 1:
            raise ValueError("PromptLookup: num_tokens and num_matches must be >= 1")
        if self.token_cost is not None and not self.token_cost >= 0:
            raise ValueError(f"PromptLookup: token_cost must be >= 0 or None (the core's curve), got {self.token_cost}")
        self._last: tuple[int, int] | None = None  # (n-gram size, drafted depth) of the last proposal

    def begin(self, target) -> None:
        self._last = None  # the acceptance statistics carry over: they describe the model and the domain

    def continuations(self, ids: np.ndarray, num_tokens: int) -> list[tuple[int, np.ndarray]]:
        """Distinct (n, continuation) pairs, longest n-gram first, most recent match first within an n."""
        found: list[tuple[int, np.ndarray]] = []
        seen: set[bytes] = set()
        t = ids.size
        for n in range(min(self.max_ngram, t - 1), self.min_ngram - 1, -1):
            windows = sliding_window_view(ids[: t - 1], n)  # [t - n, n]: every start with a token after it
            starts = np.flatnonzero((windows == ids[t - n :]).all(axis=1))
            for s in starts[::-1]:
                cont = ids[s + n : s + n + num_tokens]
                if cont.tobytes() not in seen:
                    seen.add(cont.tobytes())
                    found.append((n, cont))
                    if len(found) == self.num_matches:
                        return found
        return found

    def _rate(self, n: int) -> RunningRate:
        rate = self.stats.get(n)
        if rate is None:  # built once per key, not on every call
            rate = self.stats[n] = RunningRate(*self._PRIOR, self._DECAY)
        return rate

    def acceptance(self, n: int) -> float:
        return self._rate(n).rate

    def _length(self, n: int, max_len: int, cost: Callable[[int], float]) -> int:
        a = self.acceptance(n)
        length = best_size([a**k for k in range(1, max_len + 1)], cost).n
        if length == 0:  # not worth drafting now; drift back to the prior so it is re-probed later
            self._rate(n).relax()
        return length

    def propose(self, ctx: Context) -> TokenTree:
        self._last = None
        max_len = self.num_tokens if ctx.max_depth is None else min(self.num_tokens, ctx.max_depth)
        if max_len < 1:
            return TokenTree.empty()
        matches = self.continuations(ctx.input_ids.numpy(), max_len)
        if self.token_cost != 0:
            cost = ctx.verify_cost if self.token_cost is None else LinearCost(self.token_cost)
            matches = [(n, c[: self._length(n, len(c), cost)]) for n, c in matches]
        matches = [(n, c) for n, c in matches if c.size]
        if not matches:
            return TokenTree.empty()
        tree = TokenTree.from_sequences([c for _, c in matches])
        self._last = (matches[0][0], matches[0][1].size)
        budget = self.budget or self.num_tokens * self.num_matches
        # Nodes enter the trie sequence by sequence, so any first-k nodes keep their ancestors.
        return tree.subtree(range(budget)) if len(tree) > budget else tree

    def update(self, feedback: Feedback) -> None:
        if self._last is None:
            return
        n, drafted = self._last
        self._last = None
        if not len(feedback.tree):  # this proposal was not verified (e.g. a composed drafter chose another)
            return
        drafted = min(drafted, int(feedback.tree.depths().max()))  # a merge budget may have cut it
        accepted = len(feedback.accepted_nodes)
        trials = accepted + (1 if accepted < drafted else 0)  # the first rejection is a failed trial
        self._rate(n).add(accepted, trials)
