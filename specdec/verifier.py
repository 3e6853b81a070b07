"""The verifier: runs the stock target model over ``[root] + tree`` in ONE forward.

Only public model arguments are used: a 4D additive float mask, ``position_ids`` and
``past_key_values``; cache edits go through `specdec.kv`. Forwards over at least `packed_from`
tokens run with `specdec.packing`'s prepacked linears. Invariant between steps: the cache holds
every committed token except the last one (the root). Token ids and trees are host data; model
inputs are built on the model's device and the scores stay there. A verifier can serve a later
prompt that extends an earlier one (`specdec.Session`): the cached common prefix is kept.
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
    hidden_states: Tensor | None = None  # [n + 1, F] the requested target states, if any


def side_by_side(states: tuple[Tensor, ...], layers: tuple[int, ...]) -> Tensor:
    """HF ``output_hidden_states`` ([b, t, H] each) -> [b, t, len(layers) H]: those of `layers`,
    concatenated in that order (what a drafter with `hidden_layers` reads)."""
    return states[layers[0]] if len(layers) == 1 else torch.cat([states[i] for i in layers], dim=-1)


class Verifier:
    def __init__(self, model, *, keep_hidden_states: bool = False, packed_from: int | None = None,
                 hidden_layers: tuple[int, ...] = (-1,)):
        self.model = model
        self.cache = kv.new_cache(model)
        self.prefix = torch.zeros(0, dtype=torch.long)  # [prefix_len] the committed tokens before the root
        self._scored: tuple[int, TokenTree] | None = None  # (root, tree) of the last score(), for commit
        self.configure(keep_hidden_states=keep_hidden_states, packed_from=packed_from, hidden_layers=hidden_layers)

    def configure(self, *, keep_hidden_states: bool, packed_from: int | None,
                  hidden_layers: tuple[int, ...] = (-1,)) -> None:
        """Set per-generation options; the cache stays. `hidden_layers`: which of HF's
        ``output_hidden_states`` a kept state concatenates (default the last, post-norm; EAGLE-3
        heads ask for three)."""
        self.keep_hidden_states = keep_hidden_states
        self.hidden_layers = tuple(hidden_layers)
        self._route = PackedRoute(self.model, packed_from)

    @property
    def prefix_len(self) -> int:
        return self.prefix.numel()

    def prefill(self, input_ids: Tensor) -> Tensor | None:
        """Cache ``input_ids[:-1]`` ([t] tokens); the last token becomes the first root. Slots
        already cached for a common prefix are kept, but at least one token is fed so the first
        step has fresh hidden states. Returns the fed tokens' hidden states ([m, hidden]) when
        requested."""
        want = input_ids[:-1]
        n = min(want.numel(), self.prefix_len)
        same = (self.prefix[:n] == want[:n]).long().cumprod(0)
        common = min(int(same.sum()), max(0, want.numel() - 1))
        common = kv.truncate(self.cache, common)  # drops the last tree's slots, if any, and realigns a cut-off forward
        self.prefix, self._scored = want[:common].clone(), None  # what the cache surely holds until the forward is done
        hidden = None
        if want.numel() > common:
            with self._route(want.numel() - common):
                out = self.model(
                    input_ids=want[None, common:].to(self.model.device),
                    position_ids=torch.arange(common, want.numel(), device=self.model.device)[None],
                    **kv.cache_kwargs(self.model, self.cache),
                    use_cache=True,
                    logits_to_keep=1,  # the prefix logits are never used; skip the big lm_head matmul
                    output_hidden_states=self.keep_hidden_states,
                )
            if self.keep_hidden_states:
                hidden = self._kept(out.hidden_states)
        self.prefix = want.clone()
        return hidden

    def score(self, root: int, tree: TokenTree) -> Scores:
        inputs = verify_inputs(root, tree, self.prefix_len, self.model.dtype, self.model.device)
        with self._route(len(tree) + 1):
            out = self.model(
                input_ids=inputs.input_ids,
                position_ids=inputs.position_ids,
                attention_mask=inputs.attention_mask,
                **kv.cache_kwargs(self.model, self.cache),
                use_cache=True,
                output_hidden_states=self.keep_hidden_states,
            )
        hidden = self._kept(out.hidden_states) if self.keep_hidden_states else None
        self._scored = (root, tree)
        return Scores(out.logits[0], hidden)

    def _kept(self, states: tuple[Tensor, ...]) -> Tensor:
        """[m, F] the requested layers' states of the one sequence."""
        return side_by_side(states, self.hidden_layers)[0]

    def commit(self, accepted_nodes: list[int]) -> None:
        """Keep prefix + root + the accepted path; the next root is the target's own token."""
        root, tree = self._scored
        root_slot = self.prefix_len
        kv.keep(self.cache, root_slot + 1, [root_slot + 1 + i for i in accepted_nodes])
        self.prefix = torch.cat([self.prefix, torch.tensor([root]), tree.tokens[accepted_nodes]])
        self._scored = None
