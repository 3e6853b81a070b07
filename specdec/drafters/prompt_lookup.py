"""Prompt lookup: copy what followed the latest earlier occurrence of the context's last n-gram.

Training-free and model-free. The search runs over prompt + generated text (numpy, O(t * n) per
step). With ``num_matches > 1`` the continuations of several distinct matches merge into one
trie-shaped tree, so the verifier checks all of them in the same forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from specdec.drafter import Context, Feedback
from specdec.trees import TokenTree


@dataclass
class PromptLookup:
    num_tokens: int = 10  # longest continuation copied from one match (HF's prompt_lookup_num_tokens)
    max_ngram: int = 3  # longest suffix searched for; shorter ones are tried if it does not occur
    min_ngram: int = 1
    num_matches: int = 1  # 1 = a chain; more = a tree of distinct continuations
    budget: int | None = None  # most tree nodes; None = num_tokens * num_matches

    needs_hidden_states = False

    def __post_init__(self) -> None:
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError(f"PromptLookup: need 1 <= min_ngram <= max_ngram, got {self.min_ngram}, {self.max_ngram}")
        if self.num_tokens < 1 or self.num_matches < 1:
            raise ValueError("PromptLookup: num_tokens and num_matches must be >= 1")

    def begin(self, target) -> None:
        pass  # stateless: everything is read from the context

    def continuations(self, ids: np.ndarray, num_tokens: int) -> list[np.ndarray]:
        """Distinct continuations, longest n-gram first, most recent match first within an n."""
        found: list[np.ndarray] = []
        seen: set[bytes] = set()
        t = ids.size
        for n in range(min(self.max_ngram, t - 1), self.min_ngram - 1, -1):
            windows = sliding_window_view(ids[: t - 1], n)  # [t - n, n]: every start with a token after it
            starts = np.flatnonzero((windows == ids[t - n :]).all(axis=1))
            for s in starts[::-1]:
                cont = ids[s + n : s + n + num_tokens]
                if cont.tobytes() not in seen:
                    seen.add(cont.tobytes())
                    found.append(cont)
                    if len(found) == self.num_matches:
                        return found
        return found

    def propose(self, ctx: Context) -> TokenTree:
        num_tokens = self.num_tokens if ctx.max_depth is None else min(self.num_tokens, ctx.max_depth)
        if num_tokens < 1:
            return TokenTree.empty()
        tree = TokenTree.from_sequences(self.continuations(ctx.input_ids.numpy(), num_tokens), source="prompt-lookup")
        budget = self.budget or self.num_tokens * self.num_matches
        # Nodes enter the trie sequence by sequence, so any first-k nodes keep their ancestors.
        return tree.subtree(range(budget)) if len(tree) > budget else tree

    def update(self, feedback: Feedback) -> None:
        pass
