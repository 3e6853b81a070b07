"""Drafters built from other drafters: `Merge` (one tree from all of them) and `Fallback` (the
first one that has something to say).

Both hold any objects implementing `specdec.Drafter` and never ask what is inside: the same
`Context` goes to every part unchanged, and each part gets a `Feedback` about its own proposal
only, in its own tree's indices, so every drafter learns as if it drafted alone. Compositions
nest (a `Merge` inside a `Fallback`, or the reverse) because they are drafters themselves.

Boundary: the drafter protocol and `specdec.trees.merge`; no models, no caches.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from specdec.drafter import Context, Drafter, Feedback, check_drafter, hidden_layers
from specdec.trees import RunningRate, TokenTree, best_size, merge


def _topk_of(drafter) -> int:
    return int(getattr(drafter, "feedback_topk", 0) or 0)


def _rows(target_topk: Tensor | None, rows: list[int], k: int) -> Tensor | None:
    """The target's top-`k` rows for one part: `rows` of the composed tree's `target_topk`
    ([n + 1, K], columns in descending order, so the first k are the part's top-k)."""
    if target_topk is None or k == 0:
        return None
    return target_topk[torch.tensor(rows, dtype=torch.long)][:, :k]  # [len(rows), k]


def _memory_of(drafters) -> int:
    return sum(int(getattr(d, "memory_bytes", 0) or 0) for d in drafters)


def _layers_of(drafters, who: str) -> tuple[int, ...]:
    """The target hidden states the parts that need any read (`Drafter.hidden_layers`); parts
    reading different layers cannot share the verifier's one set."""
    wanted = {hidden_layers(d) for d in drafters if d.needs_hidden_states}
    if len(wanted) > 1:
        raise ValueError(f"{who}: its parts read different target hidden states ({sorted(wanted)}, e.g. an EAGLE-3 "
                         "head and a Medusa head); compose at most one kind of head-based drafter")
    return wanted.pop() if wanted else (-1,)


def _same_tree(a: TokenTree | None, b: TokenTree) -> bool:
    return a is not None and (a is b or (torch.equal(a.tokens, b.tokens) and torch.equal(a.parents, b.parents)))


def _committed_only(feedback: Feedback, k: int) -> Feedback:
    """What a part that had nothing verified this step may still learn: the committed tokens.
    `new_tokens` then holds more tokens than ``len(accepted_nodes) + 1``."""
    return Feedback(TokenTree.empty(), [], feedback.new_tokens, _rows(feedback.target_topk, [0], k))


class Merge:
    """Every drafter proposes from the same context; their trees merge into one trie
    (`specdec.trees.merge`), cut to the `budget` best nodes (None: no cap).

    Nodes rank by the drafter's own `TokenTree.scores`, else by ``a ** depth`` with `a` that
    drafter's running acceptance rate here (prior 0.5, decayed by `decay`; it drifts back to the
    prior when the budget drops the whole proposal). The union is cut to the n >= 1 best nodes by
    the sizing rule (`specdec.trees.sizing`) over ``ctx.verify_cost``. The merged tree carries no
    `draft_probs`, which stays lossless under `specdec.Speculative` (docs/design.md). `update`
    gives each drafter a `Feedback` on its own kept nodes (``tree.subtree(kept)``), with the
    step's `new_tokens` and target top-k rows cut to its own `feedback_topk`.
    """

    _PRIOR = (1.0, 2.0)  # [accepted, trials]: a = 0.5, weak

    def __init__(self, drafters: Sequence[Drafter], budget: int | None = None, *, decay: float = 0.95):
        drafters = list(drafters)
        if not drafters:
            raise ValueError("Merge: drafters is empty; give at least one drafter")
        for i, d in enumerate(drafters):
            check_drafter(d, f"Merge: drafters[{i}]")
        if len({id(d) for d in drafters}) < len(drafters):
            # One object proposing twice per step would lose its private state to the second call.
            raise ValueError("Merge: the same drafter object appears twice in drafters; build one per slot")
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
            raise ValueError(f"Merge: budget must be None (keep every node) or an int >= 1, got {budget!r}")
        if not 0 < decay <= 1:
            raise ValueError(f"Merge: decay must be in (0, 1] (1 = never forget), got {decay!r}")
        self.drafters = drafters
        self.budget = budget
        self.decay = decay
        self.stats = [RunningRate(*self._PRIOR, decay) for _ in drafters]  # per drafter: accepted per trial
        self._last: tuple[list[TokenTree], list[Tensor], TokenTree] | None = None

    # Read live (not copied at construction): a part may settle these in its own begin().
    @property
    def needs_hidden_states(self) -> bool:
        return any(d.needs_hidden_states for d in self.drafters)

    @property
    def hidden_layers(self) -> tuple[int, ...]:
        return _layers_of(self.drafters, "Merge")

    @property
    def feedback_topk(self) -> int:
        return max(_topk_of(d) for d in self.drafters)

    @property
    def memory_bytes(self) -> int:
        return _memory_of(self.drafters)

    def acceptance(self, j: int) -> float:
        """Drafter j's running per-token acceptance rate (ranks its nodes when it gives no scores)."""
        return self.stats[j].rate

    def begin(self, target) -> None:
        for d in self.drafters:
            d.begin(target)
        self._last = None  # the rates carry over: they describe the drafters on this model and domain

    def propose(self, ctx: Context) -> TokenTree:
        self._last = None
        trees = []
        for d in self.drafters:
            tree = d.propose(ctx)
            # The loop truncates what it gets; cutting here keeps the merged tree the one it verifies.
            trees.append(tree if ctx.max_depth is None else tree.truncate(ctx.max_depth))
        scores = [
            t.scores if t.scores is not None else self.acceptance(j) ** t.depths().double()  # [len(t)]
            for j, t in enumerate(trees)
        ]
        merged, index = merge(trees, scores, self.budget)
        if len(merged) > 1:
            best = merged.scores.sort(descending=True, stable=True).values.tolist()
            size = best_size(best, ctx.verify_cost, min_size=1).n
            if size < len(merged):
                merged, index = merge(trees, scores, size)
        self._last = (trees, index, merged)
        return merged

    def update(self, feedback: Feedback) -> None:
        last, self._last = self._last, None
        if last is None or not _same_tree(last[2], feedback.tree):
            # Not our proposal (the loop skipped drafting this step): only committed tokens to learn.
            for d in self.drafters:
                d.update(_committed_only(feedback, _topk_of(d)))
            return
        trees, index, _ = last
        depth_of = {m: k for k, m in enumerate(feedback.accepted_nodes)}  # merged node -> position on the path
        for j, (d, tree, mapped) in enumerate(zip(self.drafters, trees, index)):
            mapped = mapped.tolist()
            kept = [i for i, m in enumerate(mapped) if m >= 0]  # ancestor-closed, as the budget's ranking is
            own = tree.subtree(kept)
            # Its deepest node on the accepted path; that node's ancestors in its tree map onto
            # the path above it, so the path down to it is this drafter's accepted path.
            deepest, at = None, -1
            for i in kept:
                k = depth_of.get(mapped[i], -1)
                if k > at:
                    deepest, at = i, k
            rank = {old: new for new, old in enumerate(kept)}
            accepted = [rank[i] for i in tree.path_to(deepest)] if deepest is not None else []
            top = _rows(feedback.target_topk, [0] + [mapped[i] + 1 for i in kept], _topk_of(d))
            d.update(Feedback(own, accepted, feedback.new_tokens, top))
            self._learn(j, len(tree), own, accepted)

    def _learn(self, j: int, proposed: int, own: TokenTree, accepted: list[int]) -> None:
        if not len(own):
            if proposed:  # dropped by the budget: no evidence, drift back so it is re-tried
                self.stats[j].relax()
            return
        # One trial per level it offered a child at along the accepted path; a level where none
        # of its children was accepted ends its path.
        tip = accepted[-1] if accepted else -1
        trials = len(accepted) + (1 if own.children(tip) else 0)
        self.stats[j].add(len(accepted), trials)

    def __repr__(self) -> str:
        return f"Merge({self.drafters!r}, budget={self.budget})"


class Fallback:
    """Propose with `primary`; when its tree is empty, with `secondary` (e.g. prompt lookup when
    the text repeats, else a draft model). The drafter whose tree was verified gets the real
    `Feedback`; the other gets one with an empty tree, no accepted nodes, the step's
    `new_tokens` and only the target's top-k row for the root, so it can still follow the
    committed text. Drafts pass through untouched (draft_probs and scores included)."""

    def __init__(self, primary: Drafter, secondary: Drafter):
        check_drafter(primary, "Fallback: primary")
        check_drafter(secondary, "Fallback: secondary")
        if primary is secondary:
            raise ValueError("Fallback: primary and secondary are the same object; give two drafters")
        self.primary, self.secondary = primary, secondary
        self._proposer: Drafter | None = None

    @property
    def needs_hidden_states(self) -> bool:
        return self.primary.needs_hidden_states or self.secondary.needs_hidden_states

    @property
    def hidden_layers(self) -> tuple[int, ...]:
        return _layers_of((self.primary, self.secondary), "Fallback")

    @property
    def feedback_topk(self) -> int:
        return max(_topk_of(self.primary), _topk_of(self.secondary))

    @property
    def memory_bytes(self) -> int:
        return _memory_of((self.primary, self.secondary))

    def begin(self, target) -> None:
        self.primary.begin(target)
        self.secondary.begin(target)
        self._proposer = None

    def propose(self, ctx: Context) -> TokenTree:
        self._proposer = self.primary
        tree = self.primary.propose(ctx)
        if len(tree):
            return tree
        self._proposer = self.secondary
        return self.secondary.propose(ctx)

    def update(self, feedback: Feedback) -> None:
        proposer, self._proposer = self._proposer, None  # None: the loop skipped drafting this step
        for d in (self.primary, self.secondary):
            k = _topk_of(d)
            if d is proposer:
                top = None if feedback.target_topk is None or k == 0 else feedback.target_topk[:, :k]  # [n + 1, k]
                d.update(Feedback(feedback.tree, feedback.accepted_nodes, feedback.new_tokens, top))
            else:
                d.update(_committed_only(feedback, k))

    def __repr__(self) -> str:
        return f"Fallback({self.primary!r}, {self.secondary!r})"
