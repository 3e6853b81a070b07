"""Lookahead decoding (LADE; Fu et al. 2024): Jacobi iterations fill an n-gram pool in the same
target forward that verifies the pool's guesses. Model-free: the target does all the work.

Each proposal is one tree under the root (position t - 1): up to `max_candidates` pool n-grams
that start with the root, merged into a trie, and the lookahead chain of the current Jacobi
guesses for positions t .. t + window - 1. The target's top-1 at chain node j
(``feedback_topk = 1``) is the next iterate for position t + j + 1; past iterates stay here, and
n-grams are read along their diagonal (docs/design.md). The committed text adds its n-grams too.
The window is rebuilt from the context when it does not start right after ``ctx.input_ids``.
Scores are ``a_pool^depth`` (times the n-gram's share) and ``a_chain^depth``, running rates; the
chain is always sent and pool nodes are added by the sizing rule (`specdec.trees.sizing`).

Boundary: model-free; reads only `Context`/`Feedback` and returns `specdec.trees.TokenTree`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from specdec.drafter import Context, Feedback
from specdec.trees import RunningRate, TokenTree, best_size


@dataclass(frozen=True)
class Iterate:
    """One Jacobi level: guesses for absolute positions start, start + 1, ..."""

    start: int
    tokens: Tensor  # [k] int64
    predicted: Tensor  # [k] bool: the target's own choice (False: a random fill)

    def at(self, position: int) -> tuple[int, bool] | None:
        i = position - self.start
        if 0 <= i < self.tokens.numel():
            return int(self.tokens[i]), bool(self.predicted[i])
        return None


def _empty(start: int) -> Iterate:
    return Iterate(start, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.bool))


class Jacobi:
    needs_hidden_states = False
    feedback_topk = 1  # the target's top-1 at each chain node is the next Jacobi iterate

    _DECAY = 0.95
    _POOL_PRIOR = (1.0, 2.0)  # [accepted, trials]: a = 0.5
    _CHAIN_PRIOR = (0.2, 2.0)  # a = 0.1: a Jacobi guess is rarely right

    def __init__(self, *, window: int = 5, ngram: int = 4, max_candidates: int = 5, pool_size: int = 16, seed: int = 0):
        """`window`: Jacobi guesses sent as the lookahead chain. `ngram`: n-gram size N (the pool
        stores N - 1 tokens after each key; N - 2 past iterates are kept). `max_candidates`: pool
        continuations verified per step. `pool_size`: most n-grams kept per key token (the oldest
        go). `seed`: the random fill of fresh guess slots."""
        if window < 1:
            raise ValueError(f"Jacobi: window must be >= 1 (the lookahead chain is what fills the pool), got {window}")
        if ngram < 2:
            raise ValueError(f"Jacobi: ngram must be >= 2 (a key token plus at least one to propose), got {ngram}")
        if max_candidates < 0 or pool_size < 1:
            raise ValueError(f"Jacobi: need max_candidates >= 0 and pool_size >= 1, got {max_candidates}, {pool_size}")
        self.window, self.ngram, self.max_candidates = window, ngram, max_candidates
        self.pool_size, self.seed = pool_size, seed
        self.stats = {  # accepted tokens per trial
            "pool": RunningRate(*self._POOL_PRIOR, self._DECAY), "chain": RunningRate(*self._CHAIN_PRIOR, self._DECAY)
        }
        self.begin(None)

    def begin(self, target) -> None:
        # key token -> {continuation: times seen}; insertion order = recency (most recent last)
        self.pool: dict[int, dict[tuple[int, ...], float]] = {}
        self.levels: list[Iterate] = []  # past iterates, oldest first (at most ngram - 2)
        self.guess: Iterate | None = None  # the current window (the chain of the last proposal)
        self._indexed = torch.zeros(0, dtype=torch.long)  # [c] committed tokens whose n-grams are pooled
        self._rng = torch.Generator().manual_seed(self.seed)
        self._last: list[tuple[int, ...]] | None = None  # pool candidates of the last proposal

    # ---- the pool ---------------------------------------------------------------------------
    def add(self, key: int, continuation: tuple[int, ...]) -> None:
        """Record an n-gram (key token + ngram - 1 tokens) as the most recent for its key."""
        entries = self.pool.setdefault(key, {})
        entries[continuation] = entries.pop(continuation, 0.0) + 1.0
        while len(entries) > self.pool_size:
            del entries[next(iter(entries))]

    def candidates(self, key: int) -> list[tuple[tuple[int, ...], float]]:
        """Up to `max_candidates` (continuation, times seen) after `key`, most recent first."""
        entries = self.pool.get(key, {})
        return list(reversed(entries.items()))[: self.max_candidates]

    def _index(self, ids: Tensor) -> None:
        """Pool the n-grams of committed text not indexed yet (reconciled by common prefix)."""
        n = self.ngram
        same = (self._indexed[: ids.numel()] == ids[: self._indexed.numel()]).long()
        common = int(same.cumprod(0).sum())
        tokens = ids.tolist()
        for end in range(max(common, n - 1), len(tokens)):  # n-grams ending at a new token
            self.add(tokens[end - n + 1], tuple(tokens[end - n + 2 : end + 1]))
        self._indexed = ids.clone()

    # ---- the Jacobi window ------------------------------------------------------------------
    def _window_for(self, ids: Tensor) -> Iterate:
        """The guesses for positions t, ..., t + window - 1, padded with random context tokens."""
        t = ids.numel()
        guess = self.guess if self.guess is not None and self.guess.start == t else None
        if guess is None:  # not a continuation of the last step: start over from the context
            self.levels = []
            guess = _empty(t)
        missing = self.window - guess.tokens.numel()
        if missing > 0:
            fill = ids[torch.randint(t, (missing,), generator=self._rng)]
            guess = Iterate(
                t, torch.cat([guess.tokens, fill]), torch.cat([guess.predicted, torch.zeros(missing, dtype=torch.bool)])
            )
        return guess

    def _iterate(self, guess: Iterate, tree: TokenTree, top: Tensor | None) -> Iterate:
        """The next Jacobi iterate from the target's top-1 at the root and along the chain's nodes
        (found by token, so a tree another drafter merged into or a budget cut still works)."""
        if top is None:
            return _empty(guess.start)
        values = [int(top[0, 0])]  # the root's row: position t
        node = -1
        for tok in guess.tokens.tolist():
            node = next((c for c in tree.children(node) if int(tree.tokens[c]) == tok), None)
            if node is None:
                break
            values.append(int(top[node + 1, 0]))  # node j's row: position t + j + 1
        return Iterate(guess.start, torch.tensor(values, dtype=torch.long), torch.ones(len(values), dtype=torch.bool))

    def _harvest(self, new: Iterate) -> None:
        """Pool the n-grams along the diagonals of the last `ngram` iterates that end in `new`."""
        n = self.ngram
        rows = [*self.levels, self.guess, new][-n:]
        if len(rows) < n:
            return
        for p in range(new.start, new.start + new.tokens.numel()):
            got = [row.at(p - (n - 1) + j) for j, row in enumerate(rows)]
            if all(g is not None for g in got) and all(g[1] for g in got[1:]):
                self.add(got[0][0], tuple(g[0] for g in got[1:]))

    # ---- drafter protocol ---------------------------------------------------------------------
    def acceptance(self, which: str) -> float:
        return self.stats[which].rate

    def propose(self, ctx: Context) -> TokenTree:
        self._last = None
        ids = ctx.input_ids
        max_depth = ctx.max_depth if ctx.max_depth is not None else max(self.window, self.ngram)
        if max_depth < 1:
            return TokenTree.empty()
        self._index(ids)
        self.guess = self._window_for(ids)
        chain = self.guess.tokens[:max_depth].tolist()
        found = self.candidates(int(ids[-1]))
        self._last = [c for c, _ in found]
        total = sum(w for _, w in found) or 1.0
        a_pool, a_chain = self.acceptance("pool"), self.acceptance("chain")

        tokens: list[int] = []
        parents: list[int] = []
        pool_score: list[float] = []
        on_chain: list[bool] = []
        index: dict[tuple[int, int], int] = {}  # (parent, token) -> node

        def node(parent: int, tok: int) -> int:
            if (parent, tok) not in index:
                index[(parent, tok)] = len(tokens)
                tokens.append(tok)
                parents.append(parent)
                pool_score.append(0.0)
                on_chain.append(False)
            return index[(parent, tok)]

        for continuation, weight in found:
            parent = -1
            for depth, tok in enumerate(continuation[:max_depth], start=1):
                parent = node(parent, tok)
                pool_score[parent] += a_pool**depth * weight / total  # shares add up where candidates merge
        parent = -1
        for tok in chain:
            parent = node(parent, tok)
            on_chain[parent] = True
        depths = TokenTree(torch.tensor(tokens, dtype=torch.long), torch.tensor(parents, dtype=torch.long)).depths()
        chain_score = torch.where(torch.tensor(on_chain), a_chain ** depths.double(), 0.0)
        scores = torch.maximum(torch.tensor(pool_score, dtype=torch.float64), chain_score).clamp(max=1.0)  # [n]
        tree = TokenTree(torch.tensor(tokens, dtype=torch.long), torch.tensor(parents, dtype=torch.long), scores=scores)
        return self._sized(tree, torch.tensor(on_chain), ctx)

    def _sized(self, tree: TokenTree, on_chain: Tensor, ctx: Context) -> TokenTree:
        """Keep the chain and the pool nodes that pay for their verify time (see the module docstring)."""
        if bool(on_chain.all()):
            return tree
        extra = sorted((i for i in range(len(tree)) if not on_chain[i]), key=lambda i: (-float(tree.scores[i]), i))
        base = on_chain.nonzero().flatten().tolist()
        chances = [float(tree.scores[i]) for i in extra]
        n = best_size(chances, ctx.verify_cost, base=float(tree.scores[base].sum()), fixed=len(base)).n
        # Scores never rise from parent to child and ties go to the lower index, so any prefix of
        # `extra` keeps every kept node's ancestors.
        return tree.subtree(base + extra[:n])

    def update(self, feedback: Feedback) -> None:
        candidates, self._last = self._last, None
        guess = self.guess
        if guess is None:
            return
        tree = feedback.tree
        if len(tree) and candidates:
            prefixes = {c[:k] for c in candidates for k in range(1, len(c) + 1)}
            self._learn("pool", tree, feedback.accepted_nodes, prefixes)
        if len(tree):
            chain = tuple(guess.tokens.tolist())
            self._learn("chain", tree, feedback.accepted_nodes, {chain[:k] for k in range(1, len(chain) + 1)})
        new = self._iterate(guess, tree, feedback.target_topk)
        self._harvest(new)
        # Shift: positions below start + committed are decided; later ones keep the newest guess.
        start = guess.start + feedback.new_tokens.numel()
        keep_new = max(0, new.start + new.tokens.numel() - start)
        tokens = [new.tokens[new.tokens.numel() - keep_new :]]
        predicted = [new.predicted[new.tokens.numel() - keep_new :]]
        older_from = max(start, new.start + new.tokens.numel()) - guess.start  # old guesses past the new iterate
        tokens.append(guess.tokens[older_from:])
        predicted.append(guess.predicted[older_from:])
        self.levels = [*self.levels, guess][-(self.ngram - 2) :] if self.ngram > 2 else []
        self.guess = Iterate(start, torch.cat(tokens)[: self.window], torch.cat(predicted)[: self.window])

    def _learn(self, which: str, tree: TokenTree, accepted: list[int], prefixes: set[tuple[int, ...]]) -> None:
        """Per-token acceptance of one part of the tree: accepted nodes on its branches, plus one
        failed trial when it offered a node below the last of them that the target refused."""
        tokens = tree.tokens.tolist()
        path: tuple[int, ...] = ()
        node = -1
        for a in accepted:
            if path + (tokens[a],) not in prefixes:
                break
            path, node = path + (tokens[a],), a
        offered = any(path + (tokens[c],) in prefixes for c in tree.children(node))
        if not path and not offered:
            return  # this part had no node in the verified tree
        self.stats[which].add(len(path), len(path) + offered)
