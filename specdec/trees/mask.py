"""Model inputs for scoring ``[root] + tree`` in one forward over a cached prefix.

The mask is 4D, additive and float in the model's dtype: 0 where attention is allowed and
``finfo.min`` elsewhere. A bool mask is silently wrong under eager attention, and a 1/0 float mask
is wrong under both eager and sdpa (checked on transformers 5.0 and 5.23).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from specdec.trees.tree import TokenTree


@dataclass(frozen=True)
class VerifyInputs:
    input_ids: Tensor  # [1, m]
    position_ids: Tensor  # [1, m]
    # [1, 1, m, cached + m] additive float; None for a chain, whose tree mask is the causal mask:
    # the model then builds it itself and keeps its fastest attention path (no explicit mask).
    attention_mask: Tensor | None


def tree_mask(
    tree: TokenTree, rows: Tensor, cached_nodes: int, prefix_len: int, dtype: torch.dtype, device=None
) -> Tensor:
    """Additive mask for feeding tree nodes `rows` when the cache holds the prefix and nodes [0, cached_nodes).

    `rows` must be the nodes cached_nodes, cached_nodes + 1, ... (nodes enter the cache in index
    order). Every row sees the whole prefix, then its own ancestors among the tree nodes. Built on
    `device` (None: the CPU): only the small [m, nodes] tree part is copied there, not the mask.
    """
    allowed_tree = tree.ancestor_mask()[rows][:, : cached_nodes + rows.numel()].to(device)  # [m, nodes so far]
    allowed = torch.cat([torch.ones(rows.numel(), prefix_len, dtype=torch.bool, device=device), allowed_tree], dim=1)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


def verify_inputs(root: int, tree: TokenTree, prefix_len: int, dtype: torch.dtype, device=None) -> VerifyInputs:
    """Inputs for ``[root] + tree.tokens`` with `prefix_len` tokens already cached before the root,
    on `device` (None: the CPU), the model's.

    The root sits at position prefix_len and node i at prefix_len + depth(i): siblings share a
    position, exactly as each would if it were decoded alone.
    """
    full = TokenTree(
        torch.cat([torch.tensor([root]), tree.tokens]),
        torch.cat([torch.tensor([-1]), torch.where(tree.parents < 0, 0, tree.parents + 1)]),
    )  # the root as node 0 of a one-rooted tree, so one mask rule covers it
    n = len(full)
    depth = torch.cat([torch.zeros(1, dtype=torch.long), tree.depths()])
    return VerifyInputs(
        input_ids=full.tokens[None].to(device),
        position_ids=(prefix_len + depth)[None].to(device),
        attention_mask=None if tree.is_chain else tree_mask(full, torch.arange(n), 0, prefix_len, dtype, device),
    )
