"""Acceptance rules: given the target's logits over ``[root] + tree``, which path is kept.

A rule returns the accepted root-to-node path and the next token, the target's own choice after
that path (bonus or correction). `Greedy` reproduces greedy decoding exactly. `Speculative`
samples with exactly the distribution of sampling token by token from p, the logits after the
logits processors (as ``model.generate(do_sample=True)``), against ``tree.draft_probs`` (q).
Seeded and given ``position``, its output depends on the seed and the context alone, whatever
was drafted. `Typical` is lossy and opt-in.

Boundary: core level. Logits stay on the model's device; a rule reads at most one row per node
it visits on the host, and draws from host generators. Rationale: docs/design.md.
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
    def __call__(
        self, tree: TokenTree, logits: Tensor, generator: torch.Generator | None = None, position: int | None = None
    ) -> Decision:
        """`logits`: [n + 1, vocab], row 0 for the root, row i + 1 for node i; `position`: the
        sequence index of the token row 0 predicts (None: unknown)."""


def _generator(seed: int | None) -> torch.Generator | None:
    """None: torch's global generator, so torch.manual_seed(...) reproduces a run as with HF."""
    return None if seed is None else torch.Generator().manual_seed(seed)


def _sampled_row(row: Tensor, floor: float) -> Tensor:
    """`row` [vocab] (host logits, floor -inf, or host probabilities, floor 0) of a row a token is
    sampled from, refused when no token is left to sample. Only rows the walk reaches are checked:
    rows of branches never reached may ban everything."""
    if not bool((row > floor).any()):
        raise ValueError(
            "sampling: every token's logit is -inf at this position, so there is nothing to sample: a "
            "logits_processor (or a generation_config setting that becomes one) banned every token here; "
            "loosen it (model.generate(do_sample=True) fails on this row too)"
        )
    return row


class Greedy:
    """Walk down from the root while some child is the target's argmax; exact for greedy decoding."""

    def __call__(
        self, tree: TokenTree, logits: Tensor, generator: torch.Generator | None = None, position: int | None = None
    ) -> Decision:
        best = logits.argmax(-1).tolist()  # [n + 1]: one reduction (and one device sync) for all rows
        return _walk(tree, lambda row, depth: best[row])

    def __repr__(self) -> str:
        return "Greedy()"


def _walk(tree: TokenTree, choose) -> Decision:
    """Walk down from the root while some child holds `choose(row, depth)`, the target's token
    at that row (depth 0 at the root); the first token no child holds is the next token."""
    tokens = tree.tokens.tolist()
    path, node = [], -1
    while True:
        want = choose(node + 1, len(path))
        node = next((c for c in tree.children(node) if tokens[c] == want), None)
        if node is None:
            return Decision(path, want)
        path.append(node)


class Speculative:
    """Lossless speculative sampling over a tree (Leviathan et al. for a chain; the recursive
    rejection of SpecInfer / EAGLE-2 for siblings).

    At a node with target distribution p, child x is accepted with probability min(1, p(x) / q(x));
    on rejection p <- norm(max(0, p - q)) and the next sibling is tried; with no child accepted the
    next token is sampled from the residual. With ``tree.draft_probs`` None, q is one-hot at x.
    With draft_probs, each node's siblings must be independent samples from that node's q.
    Seeded and given `position`, it couples instead: the token at index j is the Gumbel-max of
    ``log p + g_j`` with g_j drawn from (seed, j) alone, still an exact sample from p, and the
    same text whatever was drafted.
    """

    def __init__(self, seed: int | None = None):
        self.seed = seed
        self.generator = _generator(seed)

    def __call__(
        self, tree: TokenTree, logits: Tensor, generator: torch.Generator | None = None, position: int | None = None
    ) -> Decision:
        if self.seed is not None and position is not None and generator is None:
            return _walk(tree, lambda row, depth: _gumbel_max(logits[row], self.seed, position + depth))
        gen = generator if generator is not None else self.generator
        probs = torch.softmax(logits.double(), dim=-1)  # [n + 1, vocab]; float64 keeps tiny residuals honest
        tokens = tree.tokens.tolist()
        path, node = [], -1
        while True:
            p = _sampled_row(probs[node + 1].cpu(), 0.0)  # this node's row on the host: every draw reads it there
            for child in tree.children(node):
                x = tokens[child]
                q = None if tree.draft_probs is None else tree.draft_probs[child].double().cpu()
                if q is not None and q[x] <= 0:
                    raise ValueError(f"Speculative: draft_probs gives probability 0 to drafted token {x} (node "
                                     f"{child})")
                accept = p[x] if q is None else torch.clamp(p[x] / q[x], max=1.0)
                if float(torch.rand((), generator=gen, dtype=torch.float64)) < float(accept):
                    path.append(child)
                    node = child
                    break
                if q is None:  # one-hot q: the residual is p without x
                    residual = p.clone()
                    residual[x] = 0.0
                else:
                    residual = torch.clamp(p - q, min=0.0)
                total = residual.sum()
                # A zero residual means x had all of p's mass (accept probability 1): unreachable
                # except through rounding, where keeping p is the closest correct choice.
                p = residual / total if total > 0 else p
            else:
                return Decision(path, int(torch.multinomial(p, 1, generator=gen)))

    def __repr__(self) -> str:
        return "Speculative()" if self.seed is None else f"Speculative(seed={self.seed})"


def _gumbel_max(logits: Tensor, seed: int, position: int) -> int:
    """A sample from softmax(logits) [vocab] whose randomness is fixed by (seed, position)."""
    row = _sampled_row(logits.double().cpu(), float("-inf"))
    key = (seed * 0x9E3779B97F4A7C15 + position) % 2**63  # distinct positions, distinct streams
    u = torch.rand(logits.shape[-1], generator=torch.Generator().manual_seed(key), dtype=torch.float64)
    gumbel = -torch.log(-torch.log(u.clamp(1e-300, 1 - 1e-16)))
    return int((row + gumbel).argmax())


class Typical:
    """Medusa's typical acceptance. **Lossy**: the output does not follow the target's sampling
    distribution; it trades that for longer accepted paths at high temperature.

    A draft x under a node with target distribution p is plausible when
    ``p(x) > min(epsilon, delta * exp(-H(p)))`` (H the entropy: a flat p accepts more). The walk
    takes, at each node, the plausible child with the highest p, and the next token is sampled
    from p at the last node. With a one-token p (greedy, top_k=1) this is greedy decoding.
    """

    def __init__(self, epsilon: float = 0.09, delta: float = 0.3, seed: int | None = None):
        if not (0 < epsilon <= 1 and delta > 0):
            raise ValueError(f"Typical: need 0 < epsilon <= 1 and delta > 0, got {epsilon}, {delta}")
        self.epsilon, self.delta = epsilon, delta
        self.generator = _generator(seed)

    def __call__(
        self, tree: TokenTree, logits: Tensor, generator: torch.Generator | None = None, position: int | None = None
    ) -> Decision:
        gen = generator if generator is not None else self.generator
        probs = torch.softmax(logits.double(), dim=-1)  # [n + 1, vocab]
        entropy = -(probs * torch.log(probs.clamp_min(1e-300))).sum(-1)  # [n + 1]
        threshold = torch.clamp(self.delta * torch.exp(-entropy), max=self.epsilon).tolist()  # [n + 1]
        tokens = tree.tokens.tolist()
        path, node = [], -1
        while True:
            p, bar = _sampled_row(probs[node + 1].cpu(), 0.0), threshold[node + 1]  # this node's row on the host
            plausible = [c for c in tree.children(node) if float(p[tokens[c]]) > bar]
            if not plausible:
                return Decision(path, int(torch.multinomial(p, 1, generator=gen)))
            node = max(plausible, key=lambda c: float(p[tokens[c]]))
            path.append(node)

    def __repr__(self) -> str:
        return f"Typical(epsilon={self.epsilon}, delta={self.delta})"
