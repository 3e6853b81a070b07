"""Acceptance rules: given the target's logits over ``[root] + tree``, which path is kept.

Notation (Leviathan et al., 2023): p = target distribution, q = draft distribution.
A rule returns the accepted root-to-node path and the next token, which is the target's own
choice after that path (the "bonus" token when the path is a leaf, the correction otherwise).
`Greedy` reproduces greedy decoding exactly. The protocol takes a generator so that lossless
sampling rules (rejection sampling over each node's children against ``tree.draft_probs``) fit
the same call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from specdec.trees import TokenTree


@dataclass(frozen=True)
class Decision:
    accepted_nodes: list[int]  # a path from the root; empty when the first draft is rejected
    next_token: int  # the target's token after the path


class AcceptanceRule(Protocol):
    def __call__(self, tree: TokenTree, logits: Tensor, generator: torch.Generator | None = None) -> Decision:
        """`logits`: [n + 1, vocab], row 0 for the root, row i + 1 for node i."""


class Greedy:
    """Walk down from the root while some child is the target's argmax; exact for greedy decoding."""

    def __call__(self, tree: TokenTree, logits: Tensor, generator: torch.Generator | None = None) -> Decision:
        best = logits.argmax(-1).tolist()  # [n + 1]
        tokens = tree.tokens.tolist()
        path, node = [], -1
        while True:
            want = best[node + 1]
            node = next((c for c in tree.children(node) if tokens[c] == want), None)
            if node is None:
                return Decision(path, want)
            path.append(node)

    def __repr__(self) -> str:
        return "Greedy()"
