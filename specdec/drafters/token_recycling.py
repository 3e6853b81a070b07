"""Token recycling (Luo et al. 2024): draft from the target's own discarded top-k predictions.

Each verify forward's top-k token ids after the root and every node (`Feedback.target_topk`)
fill an adjacency table ``succ`` ([vocab, topk] int32, -1 = unknown): row x holds the latest
top-k successors the target predicted after x; rows never predicted come from the committed
text's bigrams. A draft walks a static template (`specdec.trees.static` paths) breadth-first,
the rank-r child of token x being ``succ[x, r]``; unknown nodes drop with their subtree. Every
`reshape_every` steps `optimal_shape` re-sizes the template from decayed per-(depth, rank)
acceptance counts and `Context.verify_cost`. The table persists across requests; `begin`
re-allocates it only when the vocabulary size changes.

Boundary: model-free; reads only `Context`/`Feedback` and builds trees with `specdec.trees`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from specdec.drafter import Context, Feedback
from specdec.trees import LinearCost, TokenTree, optimal_shape, parents_of
from specdec.trees.static import Path

# The start shape, before any acceptance has been measured: three first-level candidates and a
# short spine under the best one (10 nodes).
DEFAULT_TEMPLATE: list[Path] = [
    (0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 0, 0, 0),
]


def _vocab_size(model) -> int:
    return model.get_output_embeddings().out_features


class TokenRecycling:
    needs_hidden_states = False
    _PRIOR_WEIGHT = 1.0  # pseudo-trials behind the prior chances 0.5, 0.25, ... per rank

    def __init__(
        self,
        topk: int = 8,
        max_nodes: int = 32,
        *,
        depth: int = 8,
        template: Sequence[Path] | None = None,
        reshape_every: int | None = 8,
        decay: float = 0.98,
        token_cost: float | None = None,
    ):
        """`topk`: successors kept per token (the template's widest rank + 1). `max_nodes`: the most
        nodes in a tree. `depth`: the deepest template level. `template`: the start shape (paths of
        ranks, parents-first; None: `DEFAULT_TEMPLATE` cut to topk/depth/max_nodes). `reshape_every`:
        steps between re-sizing the shape from the measured chances (None: keep `template` fixed).
        `decay`: weight of old acceptance counts per step. `token_cost`: extra verify cost of one
        draft node relative to a root-only forward; None uses the core's curve
        (`Context.verify_cost`)."""
        if topk < 1:
            raise ValueError(f"TokenRecycling: topk must be >= 1, got {topk}")
        if max_nodes < 1:
            raise ValueError(f"TokenRecycling: max_nodes must be >= 1, got {max_nodes}")
        if depth < 1:
            raise ValueError(f"TokenRecycling: depth must be >= 1, got {depth}")
        if reshape_every is not None and reshape_every < 1:
            raise ValueError(f"TokenRecycling: reshape_every must be >= 1 or None (fixed shape), got {reshape_every}")
        if not 0 < decay <= 1:
            raise ValueError(f"TokenRecycling: decay must be in (0, 1], got {decay}")
        if token_cost is not None and token_cost < 0:
            raise ValueError(f"TokenRecycling: token_cost must be >= 0 or None (measured curve), got {token_cost}")
        if template is None:
            template = [p for p in DEFAULT_TEMPLATE if max(p) < topk and len(p) <= depth][:max_nodes]
        template = [tuple(int(r) for r in p) for p in template]
        parents_of(template)  # raises on a path listed before its parent
        bad = [p for p in template if max(p) >= topk or min(p) < 0 or len(p) > depth]
        if bad:
            raise ValueError(
                f"TokenRecycling: template path {bad[0]} needs ranks < topk ({topk}) and length <= depth ({depth})"
            )
        if len(template) > max_nodes:
            raise ValueError(f"TokenRecycling: template has {len(template)} nodes, more than max_nodes ({max_nodes})")
        self.topk, self.max_nodes, self.depth = topk, max_nodes, depth
        self.reshape_every, self.decay, self.token_cost = reshape_every, decay, token_cost
        self.feedback_topk = topk  # ask the verifier for the target's top-k after every row
        self.succ: np.ndarray | None = None  # [vocab, topk] int32, -1 = unknown
        self.verified: np.ndarray | None = None  # [vocab] bool: row written from the target's logits
        self.hits = np.zeros((depth, topk))  # decayed: committed token was the rank-r successor at depth d + 1
        self.trials = np.zeros(depth)  # decayed: the path to depth d + 1 matched and its parent row was known
        self._prior = 0.5 ** np.arange(1, topk + 1)  # [topk], sums to < 1 as optimal_shape requires
        self._set_template(template)
        self._stale = False  # reshape at the next propose
        self._updates = 0
        self._seen = torch.zeros(0, dtype=torch.long)  # [s] committed tokens whose bigrams are in the table
        self._root: int | None = None  # the root of the step being verified

    # ---- table ---------------------------------------------------------------------------
    def begin(self, target) -> None:
        vocab = _vocab_size(target)
        if self.succ is None or self.succ.shape[0] != vocab:
            self.succ = np.full((vocab, self.topk), -1, dtype=np.int32)
            self.verified = np.zeros(vocab, dtype=bool)
            self._seen = torch.zeros(0, dtype=torch.long)
            self.hits[:], self.trials[:] = 0.0, 0.0  # they described another model
        self._root = None
        # A new call may bring another cost curve; the counts carry over (model and domain).
        self._stale = self.reshape_every is not None and bool(self.trials.sum() > 0)

    def _absorb(self, ids: torch.Tensor) -> None:
        """Bigrams of the committed tokens not seen before fill the rows the target never wrote."""
        n = min(ids.numel(), self._seen.numel())
        diff = torch.nonzero(ids[:n] != self._seen[:n])
        common = int(diff[0]) if diff.numel() else n
        if common == ids.numel():  # nothing new (a rollback or the same text again)
            return
        self._seen = ids.clone()
        new = ids[max(common - 1, 0):].numpy()
        succ, verified = self.succ, self.verified
        for x, y in zip(new[:-1].tolist(), new[1:].tolist()):
            if verified[x]:
                continue
            row = succ[x]
            if row[0] == y:
                continue
            where = np.flatnonzero(row == y)
            end = int(where[0]) if where.size else self.topk - 1
            row[1 : end + 1] = row[:end].copy()  # most recent successor first
            row[0] = y

    # ---- shape ---------------------------------------------------------------------------
    def estimates(self) -> np.ndarray:
        """[depth, topk]: chance that the rank-r successor is the committed token at depth d + 1,
        given the path to it matched; each row sums to < 1 (one committed token per trial)."""
        w = self._PRIOR_WEIGHT
        return (self.hits + w * self._prior) / (self.trials[:, None] + w)

    def _set_template(self, paths: Sequence[Path]) -> None:
        self.template = sorted(paths, key=lambda p: (len(p), p))  # breadth-first, still parents-first
        self._parents = parents_of(self.template)

    def reshape(self, verify_cost: Callable[[int], float]) -> None:
        """Re-size the template from the measured chances and the verify-cost curve."""
        shape = optimal_shape(torch.from_numpy(self.estimates()), self.max_nodes, verify_cost)
        self._set_template(shape.paths)
        self._stale = False

    # ---- drafting ------------------------------------------------------------------------
    def propose(self, ctx: Context) -> TokenTree:
        if self.succ is None:
            raise RuntimeError("TokenRecycling: call begin(target) before propose (specdec.generate does)")
        ids = ctx.input_ids
        self._absorb(ids)
        self._root = int(ids[-1])
        if self._stale:
            self.reshape(ctx.verify_cost if self.token_cost is None else LinearCost(self.token_cost))
        max_depth = self.depth if ctx.max_depth is None else min(self.depth, ctx.max_depth)
        succ, chance = self.succ, self.estimates().tolist()
        tokens: list[int] = []
        parents: list[int] = []
        scores: list[float] = []  # product of the (depth, rank) chances along the path
        node_of: list[int | None] = []  # template index -> tree index (None: skipped)
        for path, tparent in zip(self.template, self._parents):
            if len(path) > max_depth:
                break  # breadth-first: every later path is at least as deep
            parent = -1 if tparent < 0 else node_of[tparent]
            tok = -1 if parent is None else int(succ[self._root if parent < 0 else tokens[parent], path[-1]])
            if tok < 0:  # unknown successor, or its parent was skipped: drop the subtree
                node_of.append(None)
                continue
            node_of.append(len(tokens))
            tokens.append(tok)
            parents.append(parent)
            scores.append((1.0 if parent < 0 else scores[parent]) * chance[len(path) - 1][path[-1]])
        if not tokens:
            return TokenTree.empty()
        return TokenTree(
            torch.tensor(tokens, dtype=torch.long),
            torch.tensor(parents, dtype=torch.long),
            scores=torch.tensor(scores, dtype=torch.float64),
        )

    # ---- feedback ------------------------------------------------------------------------
    def update(self, feedback: Feedback) -> None:
        root, self._root = self._root, int(feedback.new_tokens[-1])  # the next root, even if propose is skipped
        if self.succ is None or root is None:
            return
        self._count(root, feedback.new_tokens.tolist())  # before the rows change: as they were when drafting
        if feedback.target_topk is not None:
            self._recycle(root, feedback)
        self._updates += 1
        if self.reshape_every is not None and self._updates % self.reshape_every == 0:
            self._stale = True

    def _count(self, root: int, committed: list[int]) -> None:
        self.hits *= self.decay
        self.trials *= self.decay
        parent = root
        for d, tok in enumerate(committed[: self.depth]):
            row = self.succ[parent]
            if row[0] < 0:  # an unknown row drafts nothing, so it is no trial
                break
            self.trials[d] += 1
            rank = np.flatnonzero(row == tok)
            if not rank.size:
                break
            self.hits[d, rank[0]] += 1
            parent = tok

    def _recycle(self, root: int, feedback: Feedback) -> None:
        top = feedback.target_topk.numpy().astype(np.int32)  # [n + 1, k]: row 0 = root, i + 1 = node i
        tokens = [root] + feedback.tree.tokens.tolist()
        # A token can sit at several nodes; the row whose context was committed wins.
        order = list(range(len(tokens))) + [0] + [i + 1 for i in feedback.accepted_nodes]
        row_of = {tokens[r]: r for r in order}
        rows = np.fromiter(row_of.keys(), dtype=np.int64)
        src = np.fromiter(row_of.values(), dtype=np.int64)
        k = min(top.shape[1], self.topk)
        self.succ[rows, :k] = top[src, :k]
        self.succ[rows, k:] = -1
        self.verified[rows] = True
