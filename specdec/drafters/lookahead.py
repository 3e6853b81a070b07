"""Lookahead (Zhao et al. 2023, Alipay's PIA): draft several branches from a frequency trie of
everything seen so far.

The trie holds every window of up to ``branch_length + max_prefix`` tokens of the prompts and
outputs of this and past requests (it persists across calls), each node counting its path.
Committed tokens are inserted once: each propose inserts only what follows the common prefix
with what it saw last. A step matches the longest context suffix (`max_prefix` down to
`min_prefix`) that has continuations and takes branches best-first by relative frequency; the
node count comes from the sizing rule (`specdec.trees.sizing`) with chances calibrated per
match length. Past `max_trie_nodes` the trie is pruned to 3/4 of it by halving counts, keeping
nodes touched by the latest text.

Boundary: model-free; reads only `Context`/`Feedback` and returns `specdec.trees.TokenTree`.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import torch

from specdec.drafter import Context, Feedback
from specdec.trees import LinearCost, RunningRate, TokenTree, best_size


def _vocab_size(model) -> int:
    return model.get_output_embeddings().out_features


class _Node:
    __slots__ = ("count", "stamp", "children")

    def __init__(self, stamp: int):
        self.count = 0
        self.stamp = stamp  # tick of the last increment, for pruning
        self.children: dict[int, _Node] | None = None


def _ratio(child: _Node, parent: _Node) -> float:
    """Relative frequency of `child` after `parent` (clamped: pruning can leave an inner node a
    smaller count than its children's)."""
    return min(1.0, child.count / max(parent.count, 1))


class TokenTrie:
    """Counts of every token window of length <= `window`, with a node cap (see the module doc)."""

    def __init__(self, window: int, max_nodes: int):
        if window < 1:
            raise ValueError(f"TokenTrie: window must be >= 1, got {window}")
        if max_nodes < 4 * window * window:
            raise ValueError(
                f"TokenTrie: max_nodes ({max_nodes}) must be >= 4 * window**2 ({4 * window * window}) so the "
                "latest text fits under the cap; raise max_trie_nodes or shorten the window"
            )
        self.window, self.max_nodes = window, max_nodes
        self.protect = max_nodes // (4 * window)  # ticks of recent text that pruning keeps
        self.root = _Node(0)
        self.size = 0  # nodes below the root
        self.tick = 0  # tokens inserted so far
        self._tail: tuple[int, ...] | None = None  # the last window - 1 tokens inserted
        self._active: list[_Node] = []  # [j]: node of the last j inserted tokens (j = 0: the root)

    def _child(self, node: _Node, tok: int) -> _Node:
        if node.children is None:
            node.children = {}
        child = node.children.get(tok)
        if child is None:
            child = node.children[tok] = _Node(self.tick)
            self.size += 1
        return child

    def _walk(self, context: Sequence[int]) -> list[_Node]:
        """Nodes of every suffix of `context` (shortest first), creating any that pruning removed
        (counted once: the text did occur)."""
        active = [self.root]
        for j in range(1, len(context) + 1):
            node = self.root
            for tok in context[len(context) - j :]:
                nxt = node.children.get(tok) if node.children else None
                if nxt is None:
                    nxt = self._child(node, tok)
                    nxt.count = 1
                node = nxt
            active.append(node)
        return active

    def insert(self, tokens: Sequence[int], context: Sequence[int] = ()) -> None:
        """Count every window that ends at one of `tokens`; windows may start inside `context`
        (the tokens just before them, already counted)."""
        context = tuple(context[max(0, len(context) - (self.window - 1)) :])
        # The active nodes depend only on the last window - 1 tokens, whatever stream they came from.
        active = self._active if context == self._tail else self._walk(context)
        for tok in tokens:
            self.tick += 1
            nxt = [self.root]
            for node in active[: self.window]:
                child = self._child(node, tok)
                child.count += 1
                child.stamp = self.tick
                nxt.append(child)
            active = nxt
            if self.size > self.max_nodes:
                self.prune()  # the active nodes carry this tick's stamp, so they survive
        self._active = active
        text = context + tuple(tokens)
        self._tail = text[max(0, len(text) - (self.window - 1)) :]

    def find(self, seq: Sequence[int]) -> _Node | None:
        node = self.root
        for tok in seq:
            node = node.children.get(tok) if node.children else None
            if node is None:
                return None
        return node

    def count(self, seq: Sequence[int]) -> int:
        """How often `seq` occurred (0 if unseen or pruned)."""
        node = self.find(seq)
        return 0 if node is None else node.count

    def prune(self) -> None:
        """Halve all counts until at most 3/4 of the cap remains (see the module doc)."""
        keep_after = self.tick - self.protect
        target = self.max_nodes * 3 // 4
        while self.size > target:
            removable, _ = self._halve(self.root, keep_after)
            if not removable:
                break  # only recent text is left

    def _halve(self, node: _Node, keep_after: int) -> tuple[int, bool]:
        """One halving pass below `node`; returns (unprotected nodes left, any recent node below)."""
        left, any_recent = 0, False
        for tok, child in list(node.children.items()):
            recent = child.stamp > keep_after
            child.count //= 2
            if child.children:
                below, recent_below = self._halve(child, keep_after)
                left += below
                recent = recent or recent_below
                if not child.children:
                    child.children = None
            if recent or child.children:
                child.count = max(child.count, 1)  # recent text stays; inner nodes keep a count for ratios
            if child.count == 0:
                del node.children[tok]
                self.size -= 1
            elif not recent:
                left += 1
            any_recent = any_recent or recent
        return left, any_recent


class Lookahead:
    needs_hidden_states = False
    _DECAY = 0.95
    _PRIOR = (1.0, 1.0)  # [accepted, predicted]: calibration 1, weak

    def __init__(
        self,
        branch_length: int = 8,
        max_prefix: int = 4,
        min_prefix: int = 1,
        budget: int = 16,
        *,
        max_trie_nodes: int = 100_000,
        token_cost: float | None = None,
    ):
        """`branch_length`: the deepest draft node. `max_prefix`/`min_prefix`: the longest and
        shortest context suffix matched against the trie. `budget`: the most tree nodes.
        `max_trie_nodes`: the trie's node cap. `token_cost`: extra verify cost of one draft node
        relative to a root-only forward; None uses the core's curve (`Context.verify_cost`); 0
        always drafts the full budget."""
        if branch_length < 1 or budget < 1:
            raise ValueError(f"Lookahead: branch_length and budget must be >= 1, got {branch_length}, {budget}")
        if not 1 <= min_prefix <= max_prefix:
            raise ValueError(f"Lookahead: need 1 <= min_prefix <= max_prefix, got {min_prefix}, {max_prefix}")
        if token_cost is not None and token_cost < 0:
            raise ValueError(f"Lookahead: token_cost must be >= 0 or None (measured curve), got {token_cost}")
        self.branch_length, self.max_prefix, self.min_prefix = branch_length, max_prefix, min_prefix
        self.budget, self.token_cost = budget, token_cost
        self.trie = TokenTrie(branch_length + max_prefix, max_trie_nodes)
        self.stats: dict[int, RunningRate] = {}  # match length -> accepted drafts per predicted
        self._seen = torch.zeros(0, dtype=torch.long)  # [s] the committed tokens already inserted
        self._vocab: int | None = None
        self._last: tuple[int, float, int] | None = None  # (match length, raw predicted, nodes) of the last tree

    def begin(self, target) -> None:
        vocab = _vocab_size(target)
        if self._vocab is not None and vocab != self._vocab:  # another tokenizer: old text means nothing
            self.trie = TokenTrie(self.trie.window, self.trie.max_nodes)
            self.stats = {}
            self._seen = torch.zeros(0, dtype=torch.long)
        self._vocab = vocab
        self._last = None

    def observe(self, ids: torch.Tensor) -> None:
        """Insert the committed tokens not inserted before (everything after the common prefix)."""
        n = min(ids.numel(), self._seen.numel())
        diff = torch.nonzero(ids[:n] != self._seen[:n])
        common = int(diff[0]) if diff.numel() else n
        if common == ids.numel():  # nothing new (a rollback or the same text again)
            return
        window = self.trie.window
        self.trie.insert(ids[common:].tolist(), ids[max(0, common - window + 1) : common].tolist())
        self._seen = ids.clone()

    def _rate(self, m: int) -> RunningRate:
        rate = self.stats.get(m)
        if rate is None:  # built once per key, not on every call
            rate = self.stats[m] = RunningRate(*self._PRIOR, self._DECAY)
        return rate

    def calibration(self, m: int) -> float:
        return self._rate(m).rate

    def _match(self, ids: list[int]) -> tuple[int, _Node] | None:
        for m in range(min(self.max_prefix, len(ids)), self.min_prefix - 1, -1):
            node = self.trie.find(ids[len(ids) - m :])
            if node is not None and node.children:
                return m, node
        return None

    def propose(self, ctx: Context) -> TokenTree:
        self._last = None
        ids = ctx.input_ids
        self.observe(ids)
        max_depth = self.branch_length if ctx.max_depth is None else min(self.branch_length, ctx.max_depth)
        tail = ids[max(0, ids.numel() - self.max_prefix) :].tolist()
        match = self._match(tail) if max_depth >= 1 else None
        if match is None:
            return TokenTree.empty()
        m, top = match
        # Best-first by frequency: a child never outscores its parent, so parents come out first.
        tokens, parents, raw = [], [], []
        # Heap entries: (-score, insertion order for ties, token, trie node, tree parent, depth).
        heap = [(-_ratio(c, top), i, tok, c, -1, 1) for i, (tok, c) in enumerate(top.children.items())]
        heapq.heapify(heap)
        order = len(heap)
        while heap and len(tokens) < self.budget:
            neg, _, tok, node, parent, depth = heapq.heappop(heap)
            me = len(tokens)
            tokens.append(tok)
            parents.append(parent)
            raw.append(-neg)
            if depth < max_depth and node.children:
                for ctok, child in node.children.items():
                    order += 1
                    heapq.heappush(heap, (neg * _ratio(child, node), order, ctok, child, me, depth + 1))
        c = self.calibration(m)
        chances = [min(1.0, c * s) for s in raw]
        if self.token_cost == 0:
            n = len(tokens)
        else:
            cost = ctx.verify_cost if self.token_cost is None else LinearCost(self.token_cost)
            n = best_size(chances, cost).n
        if n == 0:  # not worth drafting now; drift back to the prior so it is re-probed later
            self._rate(m).relax()
            return TokenTree.empty()
        self._last = (m, sum(raw[:n]), n)
        return TokenTree(
            torch.tensor(tokens[:n], dtype=torch.long),
            torch.tensor(parents[:n], dtype=torch.long),
            scores=torch.tensor(chances[:n], dtype=torch.float64),
        )

    def update(self, feedback: Feedback) -> None:
        if self._last is None or len(feedback.tree) != self._last[2]:
            return
        m, predicted, _ = self._last
        self._rate(m).add(len(feedback.accepted_nodes), predicted)
        self._last = None
