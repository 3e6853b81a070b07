"""`TokenTree`: draft tokens hanging under a root (the last committed token, not stored).

Nodes are in topological order: ``parents[i] < i``, and ``-1`` means "child of the root".
A chain of k tokens is ``parents = [-1, 0, 1, ..., k-2]``: chains need no special case anywhere.
`tokens` and `parents` live on the host (the CPU) whatever device the model uses: a tree is
control data that Python walks every step, and the verifier copies it to the model's device once.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor


# eq=False: tensors have no truth value; compare trees field by field where needed.
@dataclass(frozen=True, eq=False)
class TokenTree:
    tokens: Tensor  # [n] int64
    parents: Tensor  # [n] int64, parents[i] < i, -1 = child of the root
    # q(. | path to the parent) for each node; None means a deterministic proposal (one-hot q).
    draft_probs: Tensor | None = None  # [n, vocab]
    # The drafter's estimate that each node ends up on the accepted path (e.g. its cumulative
    # draft probability), non-increasing from parent to child; ranks nodes when trees from
    # several drafters merge under one budget. None: the drafter gives no estimate.
    scores: Tensor | None = None  # [n] float

    def __post_init__(self) -> None:
        tokens = torch.as_tensor(self.tokens, dtype=torch.long).reshape(-1).cpu()  # no-op for host tensors
        parents = torch.as_tensor(self.parents, dtype=torch.long).reshape(-1).cpu()
        object.__setattr__(self, "tokens", tokens)
        object.__setattr__(self, "parents", parents)
        self.__dict__["_token_list"] = tokens.tolist()  # as built, for check_unchanged
        self.__dict__["_parent_list"] = parents.tolist()  # fills the cached property
        n = tokens.numel()
        if parents.numel() != n:
            raise ValueError(f"TokenTree: tokens has {n} entries but parents has {parents.numel()}")
        if n and not bool((parents >= -1).all() and (parents < torch.arange(n)).all()):
            raise ValueError(f"TokenTree: parents must satisfy -1 <= parents[i] < i, got {parents.tolist()}")
        if self.draft_probs is not None and self.draft_probs.shape[0] != n:
            raise ValueError(f"TokenTree: draft_probs has {self.draft_probs.shape[0]} rows for {n} nodes")
        if self.scores is not None and self.scores.shape != (n,):
            raise ValueError(f"TokenTree: scores has shape {tuple(self.scores.shape)}, expected ({n},)")

    def check_unchanged(self) -> None:
        """Trees are immutable: depths, masks and children are derived from `parents` once. Refuse a
        tree whose tokens or parents were written in place after it was built."""
        if self.tokens.tolist() != self.__dict__["_token_list"] or self.parents.tolist() != self._parent_list:
            raise ValueError(
                "TokenTree: its tokens or parents were written in place after it was built; trees are immutable "
                "(what was derived from them would no longer match): build a new TokenTree(tokens, parents) instead"
            )

    # ---- constructors -------------------------------------------------------------------
    @classmethod
    def chain(cls, tokens, draft_probs: Tensor | None = None) -> TokenTree:
        tokens = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
        return cls(tokens, torch.arange(tokens.numel()) - 1, draft_probs)

    @classmethod
    def empty(cls) -> TokenTree:
        return cls.chain(torch.zeros(0, dtype=torch.long))

    @classmethod
    def from_sequences(cls, sequences) -> TokenTree:
        """Merge token sequences (all continuing the root) into a trie; shared prefixes appear once."""
        tokens: list[int] = []
        parents: list[int] = []
        index: dict[tuple[int, int], int] = {}  # (parent, token) -> node
        for seq in sequences:
            parent = -1
            for tok in (int(t) for t in seq):
                node = index.get((parent, tok))
                if node is None:
                    node = index[(parent, tok)] = len(tokens)
                    tokens.append(tok)
                    parents.append(parent)
                parent = node
        return cls(torch.tensor(tokens, dtype=torch.long), torch.tensor(parents, dtype=torch.long))

    # ---- structure ----------------------------------------------------------------------
    def __len__(self) -> int:
        return self.tokens.numel()

    @cached_property
    def _parent_list(self) -> list[int]:
        return self.parents.tolist()

    @property
    def is_chain(self) -> bool:
        return self._parent_list == list(range(-1, len(self) - 1))

    @cached_property
    def _depths(self) -> Tensor:
        depths: list[int] = []
        for p in self._parent_list:
            depths.append(1 if p < 0 else depths[p] + 1)
        return torch.tensor(depths, dtype=torch.long)

    def depths(self) -> Tensor:
        """[n]: 1 for children of the root."""
        return self._depths

    @cached_property
    def _ancestor_mask(self) -> Tensor:
        n = len(self)
        mask = torch.eye(n, dtype=torch.bool)
        for i, p in enumerate(self._parent_list):
            if p >= 0:
                mask[i] |= mask[p]
        return mask

    def ancestor_mask(self) -> Tensor:
        """[n, n] bool: mask[i, j] is True when j is i or an ancestor of i."""
        return self._ancestor_mask

    @cached_property
    def _children(self) -> dict[int, list[int]]:
        children: dict[int, list[int]] = {}
        for c, p in enumerate(self._parent_list):
            children.setdefault(p, []).append(c)
        return children

    def children(self, i: int) -> list[int]:
        """Children of node i in index order (i = -1 is the root)."""
        return list(self._children.get(i, ()))

    def path_to(self, i: int) -> list[int]:
        """Nodes from the root's child down to i (empty for the root, i = -1)."""
        path = []
        while i >= 0:
            path.append(i)
            i = self._parent_list[i]
        return path[::-1]

    def subtree(self, keep) -> TokenTree:
        """The tree restricted to `keep` (must contain every kept node's ancestors), re-indexed."""
        keep = sorted(set(int(k) for k in keep))
        new_index = {old: new for new, old in enumerate(keep)}
        try:
            parents = [new_index[p] if p >= 0 else -1 for p in (self._parent_list[k] for k in keep)]
        except KeyError as err:
            raise ValueError(f"TokenTree.subtree: keep is missing ancestor {err.args[0]}") from None
        idx = torch.tensor(keep, dtype=torch.long)
        return TokenTree(
            self.tokens[idx],
            torch.tensor(parents, dtype=torch.long),
            None if self.draft_probs is None else self.draft_probs[idx],
            None if self.scores is None else self.scores[idx],
        )

    def truncate(self, max_depth: int) -> TokenTree:
        """Drop nodes deeper than `max_depth` (the root has depth 0)."""
        if not len(self) or int(self._depths.max()) <= max_depth:
            return self
        return self.subtree(torch.nonzero(self._depths <= max_depth).flatten().tolist())
