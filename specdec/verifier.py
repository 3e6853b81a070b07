"""The verifier: runs the stock target model over ``[root] + tree`` in ONE forward.

Only public model arguments are used: a 4D additive float mask, ``position_ids`` and
``past_key_values``. Cache compaction is delegated to `specdec.kv`. Forwards over at least
`packed_from` tokens run with `specdec.packing`'s oneDNN-prepacked linears (faster on CPU for
small k; the crossover comes from `specdec.profile`); shorter ones run the model as it is.
Invariant between steps: the cache holds every committed token except the last one (the root).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from specdec import kv
from specdec.packing import PackedRoute
from specdec.trees import TokenTree, verify_inputs


@dataclass(frozen=True)
class Scores:
    logits: Tensor  # [n + 1, vocab]: row 0 is the root (predicts its children), row i + 1 is node i
    hidden_states: Tensor | None = None  # [n + 1, hidden] target last-layer states, if requested


class Verifier:
    def __init__(self, model, *, keep_hidden_states: bool = False, packed_from: int | None = None):
        self.model = model
        self.keep_hidden_states = keep_hidden_states
        self.cache = kv.new_cache(model)
        self.prefix_len = 0  # cached tokens before the root
        self._route = PackedRoute(model, packed_from)

    def prefill(self, input_ids: Tensor) -> Tensor | None:
        """Cache ``input_ids[:-1]`` ([t] tokens); the last token becomes the first root.
        Returns their hidden states ([t - 1, hidden]) when requested."""
        hidden = None
        if input_ids.numel() > 1:
            with self._route(input_ids.numel() - 1):
                out = self.model(
                    input_ids=input_ids[None, :-1].to(self.model.device),
                    **kv.cache_kwargs(self.model, self.cache),
                    use_cache=True,
                    logits_to_keep=1,  # the prefix logits are never used; skip the big lm_head matmul
                    output_hidden_states=self.keep_hidden_states,
                )
            if self.keep_hidden_states:
                hidden = out.hidden_states[-1][0]
        self.prefix_len = input_ids.numel() - 1
        return hidden

    def score(self, root: int, tree: TokenTree) -> Scores:
        inputs = verify_inputs(root, tree, self.prefix_len, self.model.dtype)
        device = self.model.device
        with self._route(len(tree) + 1):
            out = self.model(
                input_ids=inputs.input_ids.to(device),
                position_ids=inputs.position_ids.to(device),
                attention_mask=None if inputs.attention_mask is None else inputs.attention_mask.to(device),
                **kv.cache_kwargs(self.model, self.cache),
                use_cache=True,
                output_hidden_states=self.keep_hidden_states,
            )
        hidden = out.hidden_states[-1][0] if self.keep_hidden_states else None
        return Scores(out.logits[0], hidden)

    def commit(self, accepted_nodes: list[int]) -> None:
        """Keep prefix + root + the accepted path; the next root is the target's own token."""
        root_slot = self.prefix_len
        kv.keep(self.cache, root_slot + 1, [root_slot + 1 + i for i in accepted_nodes])
        self.prefix_len += 1 + len(accepted_nodes)
