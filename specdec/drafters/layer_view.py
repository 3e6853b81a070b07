"""`LayerSubset`: the target's embedding, a chosen subset of its decoder layers (in order), its
final norm and lm_head, run as a model of its own that shares every weight with the target.

Nothing is copied or changed on the target (no attribute, config field or hook): the view calls
the public forwards of the target's own submodules and leaves out the skipped layers. A cache
from `new_cache` holds the chosen layers at their original ``layer_idx``. Masks are 4D additive
floats; a multi-token feed without one gets an explicit causal mask over cache + new tokens.

Boundary: Llama-family layouts (``get_decoder()`` with ``embed_tokens``, ``rotary_emb``,
``layers``, ``norm``; ``get_output_embeddings()``) with full attention. Other layouts raise a
ValueError naming the missing part; `check_faithful` refuses models whose forward does more.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from specdec import kv
from specdec.trees import best_size


def causal_mask(past: int, m: int, dtype: torch.dtype, device=None) -> Tensor:
    """[1, 1, m, past + m] additive mask: new token i sees the `past` cached slots and new tokens <= i."""
    allowed = torch.ones(m, past + m, dtype=torch.bool, device=device).tril(diagonal=past)
    mask = torch.zeros(m, past + m, dtype=dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


@dataclass(frozen=True)
class SubsetOutput:
    logits: Tensor  # [m, vocab] (or [1, vocab] with last_only), in the model's dtype
    # Input of each chosen layer, then the last chosen layer's output (before the final norm);
    # only with return_states.
    states: Tensor | None = None  # [len(layers) + 1, m, hidden]


def _parts(model) -> tuple[nn.Module, nn.Module, nn.Module, nn.ModuleList, nn.Module, nn.Module]:
    """(decoder, embed_tokens, rotary_emb, layers, norm, lm_head) or a ValueError naming what is missing."""
    name = type(model).__name__
    get_decoder = getattr(model, "get_decoder", None)
    get_head = getattr(model, "get_output_embeddings", None)
    if get_decoder is None or get_head is None:
        raise ValueError(
            f"LayerSubset: {name} is not a transformers causal LM (no get_decoder/get_output_embeddings); "
            "pass the *ForCausalLM model"
        )
    decoder, head = get_decoder(), get_head()
    parts = ("embed_tokens", "rotary_emb", "norm")
    missing = [p for p in parts if not isinstance(getattr(decoder, p, None), nn.Module)]
    try:
        blocks = decoder.get_submodule("layers")
    except AttributeError:
        blocks = None
    if not isinstance(blocks, nn.ModuleList):
        missing.append("layers")
    if not isinstance(head, nn.Module):
        missing.append("lm_head")
    if missing:
        raise ValueError(
            f"LayerSubset: {name} lacks {', '.join(missing)} where the Llama layout has them "
            "(a decoder with embed_tokens, rotary_emb, a layers ModuleList and norm, plus an lm_head); "
            "layer-subset drafters support Llama-style decoder-only models only"
        )
    return decoder, decoder.embed_tokens, decoder.rotary_emb, blocks, decoder.norm, head


class LayerSubset:
    """The target with only `layers` (ascending decoder-layer indices, kept as `indices`) run;
    every weight is the target's own."""

    def __init__(self, model, layers):
        _, self._embed, self._rotary, blocks, self._norm, self._head = _parts(model)
        layers = [int(i) for i in layers]
        n = len(blocks)
        if any(not 0 <= i < n for i in layers) or layers != sorted(set(layers)):
            raise ValueError(
                f"LayerSubset: layers must be distinct, ascending indices in [0, {n}) "
                f"(the target has {n} decoder layers), got {layers}"
            )
        self.model = model
        self.indices = tuple(layers)  # chosen decoder layers, ascending
        self.num_layers = n  # of the target
        self._blocks = [blocks[i] for i in layers]

    def weights(self) -> int:
        """Parameters a one-token forward reads: the chosen layers, the final norm and the lm_head
        (the embedding only gives up one row). On CPU that count sets the forward's cost."""
        modules = [*self._blocks, self._norm, self._head]
        return sum(p.numel() for module in modules for p in module.parameters())

    def new_cache(self):
        """An empty cache for this view (one slot list per target layer; only the chosen ones fill)."""
        return kv.new_cache(self.model)

    def cached(self, cache) -> int:
        """Slots in `cache` (0 for an empty view, which never attends)."""
        return kv.length(cache, self.indices[0]) if self.indices else 0

    def __call__(
        self,
        ids: Tensor | None,
        positions: Tensor,
        *,
        cache=None,
        mask: Tensor | None = None,
        hidden: Tensor | None = None,
        last_only: bool = False,
        return_states: bool = False,
    ) -> SubsetOutput:
        """Feed `ids` ([m]) at `positions` ([m]) after what `cache` holds (None: nothing cached and
        nothing stored). `mask`: [1, 1, m, cached + m] additive float; None means the m tokens
        directly follow the cached ones (a causal prefix feed). `hidden` ([m, hidden]) replaces the
        embedding as the first chosen layer's input (then `ids` may be None): a caller that has the
        target's own state at that layer skips recomputing the layers before it."""
        device = self._head.weight.device
        positions = positions.to(device)[None]  # [1, m]
        if hidden is None:
            h = self._embed(ids.to(device)[None])  # [1, m, hidden]
        else:
            h = hidden.to(device)[None]
        m = h.shape[1]
        if mask is None and m > 1:
            mask = causal_mask(0 if cache is None else self.cached(cache), m, h.dtype, device)
        elif mask is not None:
            mask = mask.to(device=device, dtype=h.dtype)
        rope = self._rotary(h, positions)  # (cos, sin), each [1, m, head_dim]
        states = [h[0]] if return_states else None
        for block in self._blocks:
            out = block(
                h,
                attention_mask=mask,
                position_ids=positions,
                position_embeddings=rope,
                **kv.cache_kwargs(block, cache),
                use_cache=cache is not None,
            )
            h = out[0] if isinstance(out, tuple) else out  # older releases return a tuple
            if states is not None:
                states.append(h[0])
        if last_only:
            h = h[:, -1:]
        logits = self._head(self._norm(h))[0]  # [m, vocab]
        return SubsetOutput(logits, None if states is None else torch.stack(states))


_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}  # relative to the logits' scale; others: 2e-2


@torch.no_grad()
def check_faithful(model, num_tokens: int = 6) -> None:
    """Raise a ValueError unless `LayerSubset(model, every layer)` reproduces ``model(...)``'s
    logits on a short input: the view relies on the target's forward being exactly embed -> layers
    -> norm -> lm_head, which a model with extra steps (an embedding scale, soft-capped logits)
    would break without any error."""
    view = LayerSubset(model, range(len(_parts(model)[3])))
    vocab = view._head.weight.shape[0]
    ids = torch.arange(1, num_tokens + 1) * 7 % vocab  # [num_tokens]: any tokens will do
    positions = torch.arange(num_tokens)
    mine = view(ids, positions).logits.double()  # [num_tokens, vocab]
    theirs = model(input_ids=ids[None].to(model.device), use_cache=False).logits[0].double()
    tol = _TOLERANCE.get(view._head.weight.dtype, 2e-2) * (1.0 + float(theirs.abs().max()))
    err = float((mine.to(theirs.device) - theirs).abs().max())
    if not err <= tol:
        raise ValueError(
            f"LayerSubset: running {type(model).__name__}'s parts one by one differs from its forward "
            f"(max logit error {err:.3g} > {tol:.3g}); its forward does more than embed -> layers -> norm -> "
            "lm_head, so layer-subset drafters do not support it"
        )


# Calibration of self-drafting (LayerSkip, EarlyExit): the value of drafting with a view.
MIN_WINDOW = 8  # fewer committed tokens say too little about the layers: wait for more


def draft_value(agreement: float, draft_cost: float, max_depth: int, verify_cost: Callable[[int], float]) -> float:
    """Expected tokens per unit of time (target forwards) of drafting a chain through a view,
    best over depths 1..max_depth (`specdec.trees.best_size`): each draft token matches the target
    with chance `agreement` given the previous one did, and costs `draft_cost` target forwards;
    `verify_cost` is `Context.verify_cost`. Below 1, plain decoding is faster."""
    chain = [agreement**d for d in range(1, max_depth + 1)]
    return best_size(chain, verify_cost, min_size=1, draft_cost=draft_cost).value
