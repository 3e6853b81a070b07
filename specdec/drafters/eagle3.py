"""EAGLE-3's head: the target's low, middle and high layers fused by one `fc`, one Llama layer.

Pair p is (a_p, x_{p+1}): a_p the hidden states entering the `aux_layers` (HF
``output_hidden_states`` indices, default ``(2, N // 2, N - 3)``) concatenated, [3 H]. ``fc``
projects it to H; the layer reads ``[input_layernorm(embed(x_{p+1})); hidden_norm(h)]`` (2 H into
q/k/v, no bias) and its output before the head's own `norm` is h_{p+1}, fed back unprojected for
the next draft step; ``lm_head(norm(h))`` scores the draft vocabulary, column j being token
``j + d2t[j]`` (``t2d`` marks those tokens). Keys and config follow the EAGLE-3 / SpecForge
layout that SGLang and vLLM load, so a head exports by copying its state dict.

Boundary: torch, transformers' Llama attention/MLP/norm/rotary modules, `specdec.kv`; the
`Eagle` drafter and the training recipe drive it.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding

from specdec import kv

AUX_KEY = "eagle_aux_hidden_state_layer_ids"
KIND = "eagle3"  # the drafter kind specdec's checkpoints of these heads record


def default_aux_layers(num_layers: int) -> tuple[int, int, int]:
    """EAGLE-3's default: the hidden states entering layers 2, N // 2 and N - 3 (kept within
    [0, N] for targets of fewer than 6 layers)."""
    return min(2, num_layers), num_layers // 2, max(num_layers - 3, 0)


def check_aux_layers(layers, num_layers: int, who: str) -> tuple[int, ...]:
    """`layers` as a tuple of HF hidden-state indices in [0, num_layers], or a clear error."""
    layers = tuple(layers)
    if len(layers) != 3 or not all(isinstance(i, int) and 0 <= i <= num_layers for i in layers):
        raise ValueError(f"{who}: aux layers must be three HF hidden-state indices in [0, {num_layers}] (the "
                         f"states entering those layers of the target), got {list(layers)}")
    return layers


def head_config(target_config, *, aux_layers=None, intermediate_size: int | None = None,
                draft_vocab_size: int | None = None, norm_before_residual: bool = False) -> LlamaConfig:
    """The head's one-layer Llama config for a target config: the target's attention shape, norm
    epsilon and rotary parameters; its MLP width `intermediate_size` (default the target's)."""
    t = target_config
    num_layers = int(t.num_hidden_layers)
    heads = int(t.num_attention_heads)
    config = LlamaConfig(
        vocab_size=int(t.vocab_size), hidden_size=int(t.hidden_size),
        intermediate_size=int(intermediate_size or t.intermediate_size), num_hidden_layers=1,
        num_attention_heads=heads, num_key_value_heads=int(getattr(t, "num_key_value_heads", None) or heads),
        head_dim=int(getattr(t, "head_dim", None) or t.hidden_size // heads), hidden_act="silu",
        max_position_embeddings=int(t.max_position_embeddings), rms_norm_eps=float(t.rms_norm_eps),
        rope_parameters=copy.deepcopy(getattr(t, "rope_parameters", None)), attention_bias=False, mlp_bias=False,
        tie_word_embeddings=False,
    )
    config.draft_vocab_size = int(draft_vocab_size or t.vocab_size)
    config.target_hidden_size = int(t.hidden_size)
    config.norm_before_residual = bool(norm_before_residual)
    aux = default_aux_layers(num_layers) if aux_layers is None else aux_layers
    setattr(config, AUX_KEY, list(check_aux_layers(aux, num_layers, "Eagle3Head")))
    config._attn_implementation = "sdpa"
    return config


class Eagle3Layer(nn.Module):
    """EAGLE-3's midlayer: a Llama decoder layer whose attention reads the normed embedding and
    normed hidden state side by side (q/k/v take 2 H)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.norm_before_residual = bool(config.norm_before_residual)
        self.input_layernorm = LlamaRMSNorm(hidden, eps=eps)
        self.hidden_norm = LlamaRMSNorm(hidden, eps=eps)
        self.self_attn = LlamaAttention(config, layer_idx=0)
        attn, dim = self.self_attn, config.head_dim
        attn.q_proj = nn.Linear(2 * hidden, config.num_attention_heads * dim, bias=False)
        attn.k_proj = nn.Linear(2 * hidden, config.num_key_value_heads * dim, bias=False)
        attn.v_proj = nn.Linear(2 * hidden, config.num_key_value_heads * dim, bias=False)
        self.post_attention_layernorm = LlamaRMSNorm(hidden, eps=eps)
        self.mlp = LlamaMLP(config)

    def forward(self, embeds: Tensor, hidden: Tensor, rope, attention_mask: Tensor, cache=None) -> Tensor:
        embeds = self.input_layernorm(embeds)
        if self.norm_before_residual:
            hidden = residual = self.hidden_norm(hidden)
        else:
            residual, hidden = hidden, self.hidden_norm(hidden)
        attn, _ = self.self_attn(torch.cat([embeds, hidden], dim=-1), position_embeddings=rope,
                                 attention_mask=attention_mask, **kv.cache_kwargs(self.self_attn, cache))
        hidden = residual + attn
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class Eagle3Head(nn.Module):
    """fc (3 H -> H, no bias) + `Eagle3Layer` + own norm + draft-vocabulary lm_head; buffers d2t
    ([V'] int64 offsets) and t2d ([vocab] bool). `kv.new_cache(head)` gives its cache."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        hidden = config.hidden_size
        if 3 * config.target_hidden_size == hidden:
            raise ValueError("Eagle3Head: 3 x target_hidden_size equals hidden_size, so fused target states could not "
                             "be told from the head's own; use another hidden size")
        self.config = config
        self.hidden_size = hidden
        self.aux_layers = tuple(getattr(config, AUX_KEY))
        self.fc = nn.Linear(3 * config.target_hidden_size, hidden, bias=False)
        self.midlayer = Eagle3Layer(config)
        self.norm = LlamaRMSNorm(hidden, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(hidden, config.draft_vocab_size, bias=False)
        self.register_buffer("d2t", torch.zeros(config.draft_vocab_size, dtype=torch.long))
        self.register_buffer("t2d", torch.zeros(config.vocab_size, dtype=torch.bool))
        self.rotary = LlamaRotaryEmbedding(config=config)

    @classmethod
    def for_target(cls, model, draft_ids: Tensor | None = None, **options) -> Eagle3Head:
        """A fresh head for `model` (options: see `head_config`), scoring token ids `draft_ids`
        (sorted; None: the whole vocabulary). The lm_head starts as the target's rows for those
        ids and the norm as the target's final norm; the rest is randomly initialised."""
        vocab = model.get_output_embeddings().weight.shape[0]
        ids = torch.arange(vocab) if draft_ids is None else draft_ids.long().cpu()
        config = head_config(model.config, draft_vocab_size=ids.numel(), **options)
        config.vocab_size = vocab  # the lm_head's rows, which a config's vocab_size may undercount
        head = cls(config)
        with torch.no_grad():
            head.set_vocab(ids)
            head.lm_head.weight.copy_(model.get_output_embeddings().weight.detach()[ids.to(model.device)].cpu())
            norm = getattr(model.get_decoder(), "norm", None)
            if isinstance(getattr(norm, "weight", None), Tensor) and norm.weight.shape == head.norm.weight.shape:
                head.norm.weight.copy_(norm.weight.detach().cpu())
        return head.to(device=model.device, dtype=model.dtype)

    def set_vocab(self, ids: Tensor) -> None:
        """Point the draft columns at sorted token ids `ids` [V'] (fills d2t and t2d)."""
        ids = ids.to(self.d2t.device)
        self.d2t.copy_(ids - torch.arange(ids.numel(), device=ids.device))
        self.t2d.zero_()
        self.t2d[ids] = True

    @property
    def draft_ids(self) -> Tensor:
        """[V'] the token id of each lm_head column (on the host)."""
        return (torch.arange(self.d2t.numel(), device=self.d2t.device) + self.d2t).cpu()

    @property
    def feature_size(self) -> int:
        """Width of a real pair's feature: the fused target states."""
        return self.fc.in_features

    @property
    def hidden_layers(self) -> tuple[int, ...]:
        """The target states it reads (HF ``output_hidden_states`` indices)."""
        return self.aux_layers

    def forward(self, features: Tensor, embeds: Tensor, position_ids: Tensor, attention_mask: Tensor,
                cache=None) -> Tensor:
        """features [b, m, 3 H] fused target states, or [b, m, H] the head's own outputs (draft
        steps after the first); embeds [b, m, H] of x_{p+1}; position_ids [b, m]; attention_mask
        [b or 1, 1, m, cached + m] additive -> [b, m, H] the layer's output before `norm`."""
        dtype = self.fc.weight.dtype
        x = features.to(dtype)
        if x.shape[-1] == self.fc.in_features:
            x = self.fc(x)
        return self.midlayer(embeds.to(dtype), x, self.rotary(x, position_ids), attention_mask.to(dtype), cache)

    def logits(self, out: Tensor) -> Tensor:
        """[..., H] layer outputs -> [..., V'] draft-vocabulary logits."""
        return self.lm_head(self.norm(out))

    def describe(self) -> dict:
        """The config fields a checkpoint stores (beside the target it was trained for)."""
        c = self.config
        return {"hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
                "num_attention_heads": c.num_attention_heads, "num_key_value_heads": c.num_key_value_heads,
                "head_dim": c.head_dim, "draft_vocab_size": c.draft_vocab_size, "aux_layers": list(self.aux_layers),
                "norm_before_residual": c.norm_before_residual}

    def check(self, target, who: str = "Eagle") -> None:
        """Refuse a target this head cannot read: other hidden size, vocabulary or layer count."""
        t = target.config
        vocab = target.get_output_embeddings().weight.shape[0]
        if int(t.hidden_size) != self.config.target_hidden_size:
            raise ValueError(f"{who}: the EAGLE-3 head reads target states of size {self.config.target_hidden_size}, "
                             f"but the target's hidden size is {t.hidden_size}; use a head trained for this target")
        if vocab != self.t2d.numel():
            raise ValueError(f"{who}: the EAGLE-3 head maps a vocabulary of {self.t2d.numel()} tokens but the target "
                             f"has {vocab}; use a head trained for this target")
        check_aux_layers(self.aux_layers, int(t.num_hidden_layers), who)
