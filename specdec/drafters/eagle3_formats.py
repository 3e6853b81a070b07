"""EAGLE-3 heads in the layouts serving engines load, both ways.

``specforge``: EAGLE-3 / SpecForge's ``LlamaForCausalLMEagle3`` (SGLang, vLLM, TensorRT-LLM):
config.json a one-layer Llama config plus `draft_vocab_size`, `target_hidden_size`,
`norm_before_residual` and the aux layer ids (top level and under `eagle_config`);
model.safetensors `fc`, `midlayer.*`, `norm`, `lm_head`, `d2t`, `t2d`. ``speculators``:
vLLM's `speculators` config (``Eagle3Speculator``, `transformer_layer_config`,
`speculators_config`), the same weights with ``layers.0.`` for ``midlayer.``, plus the target's
input embedding as ``embed_tokens.weight`` (the speculators package saves it, and its loader leaves a
missing one uninitialised; vLLM shares it with the target either way). Aux layer ids are HF
``output_hidden_states`` indices (the state entering that layer). The SpecForge layout holds no
embedding: engines share the target's. Reading drops any embedding: the head reads the target's.
Writes are atomic (`checkpoint.write_directory`).

Boundary: files, configs and validation; the head is `specdec.drafters.eagle3.Eagle3Head`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from specdec.drafters import checkpoint
from specdec.drafters.eagle3 import AUX_KEY, KIND, Eagle3Head, default_aux_layers, head_config

SPECFORGE, SPECULATORS = "specforge", "speculators"
ARCHITECTURE = "LlamaForCausalLMEagle3"
SPECULATOR = "Eagle3Speculator"
SPECULATORS_VERSION = "0.9.0"  # the speculators release whose config schema this writes
CONFIG, WEIGHTS = "config.json", "model.safetensors"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def foreign(directory) -> bool:
    """Whether `directory` holds an engine-layout head (a config.json, no specdec header)."""
    d = Path(directory)
    return (d / CONFIG).is_file() and not (d / checkpoint.CONFIG_NAME).is_file()


def build(model, *, hidden_size: int, intermediate_size: int, num_attention_heads: int, num_key_value_heads: int,
          head_dim: int, draft_vocab_size: int, aux_layers, norm_before_residual: bool = False) -> Eagle3Head:
    """An empty head for `model` (its dtype and device) with a checkpoint's config fields
    (`Eagle3Head.describe`)."""
    if int(hidden_size) != int(model.config.hidden_size):
        raise ValueError(f"the head's hidden size {hidden_size} differs from the target's {model.config.hidden_size}: "
                         "heads with their own embedding are not supported")
    config = head_config(model.config, aux_layers=aux_layers, intermediate_size=intermediate_size,
                         draft_vocab_size=draft_vocab_size, norm_before_residual=norm_before_residual)
    config.vocab_size = model.get_output_embeddings().weight.shape[0]
    config.num_attention_heads, config.num_key_value_heads = int(num_attention_heads), int(num_key_value_heads)
    config.head_dim = int(head_dim)
    return Eagle3Head(config).to(device=model.device, dtype=model.dtype)


def _llama_config(head: Eagle3Head) -> dict:
    c = head.config
    rope = dict(c.rope_parameters or {})
    fields = {
        "architectures": [ARCHITECTURE], "model_type": "llama", "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size, "num_hidden_layers": 1, "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads, "head_dim": c.head_dim, "hidden_act": "silu",
        "max_position_embeddings": c.max_position_embeddings, "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": rope.get("rope_theta", 10000.0), "attention_bias": False, "mlp_bias": False,
        "tie_word_embeddings": False, "vocab_size": c.vocab_size, "draft_vocab_size": c.draft_vocab_size,
    }
    if rope.get("rope_type", "default") != "default":
        fields["rope_scaling"] = rope
    return fields


def _tensors(head: Eagle3Head, dtype: torch.dtype, layer_prefix: str) -> dict[str, Tensor]:
    out = {}
    for key, value in head.state_dict().items():
        if key.startswith("midlayer."):
            key = layer_prefix + key[len("midlayer."):]
        out[key] = value.detach().cpu().to(dtype) if value.is_floating_point() else value.detach().cpu()
    return out


def export(head: Eagle3Head, directory, layout: str = SPECFORGE, *, dtype: str | None = None, verifier: str = "",
           verifier_architectures: tuple[str, ...] = (), embedding: Tensor | None = None,
           speculative_tokens: int = 3) -> Path:
    """Write `head` to `directory` in `layout` (`SPECFORGE` or `SPECULATORS`), weights in `dtype`
    (None: the head's). `verifier` / `verifier_architectures`: the target's HF id or path and its
    classes, which a speculators config must name (vLLM serves that verifier); `embedding`: the
    target's input embedding [vocab, H], which the speculators layout stores (unused otherwise);
    `speculative_tokens`: the draft length vLLM takes from the speculators config."""
    if layout not in (SPECFORGE, SPECULATORS):
        raise ValueError(f"layout must be {SPECFORGE!r} or {SPECULATORS!r}, got {layout!r}")
    dtype = dtype or str(head.fc.weight.dtype).removeprefix("torch.")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if layout == SPECULATORS and not verifier:
        raise ValueError("a speculators config names its verifier: pass the target's HF id or path (--verifier)")
    c = head.config
    if layout == SPECULATORS and (embedding is None or tuple(embedding.shape) != (c.vocab_size, c.hidden_size)):
        got = "none" if embedding is None else f"shape {list(embedding.shape)}"
        raise ValueError(f"a speculators checkpoint stores the target's input embedding [{c.vocab_size}, "
                         f"{c.hidden_size}] (the speculators package leaves a missing one uninitialised): pass "
                         f"embedding=model.get_input_embeddings().weight, got {got}")
    aux = list(head.aux_layers)
    extra = {"target_hidden_size": c.target_hidden_size, "norm_before_residual": c.norm_before_residual,
             AUX_KEY: aux}
    if layout == SPECFORGE:
        config = {**_llama_config(head), **extra, "torch_dtype": dtype,
                  "eagle_config": {"use_aux_hidden_state": True, AUX_KEY: aux}}
        tensors = _tensors(head, DTYPES[dtype], "midlayer.")
    else:
        layer = {k: v for k, v in _llama_config(head).items() if k not in ("architectures", "draft_vocab_size")}
        config = {
            "architectures": [SPECULATOR], "speculators_model_type": "eagle3",
            "speculators_version": SPECULATORS_VERSION,
            "transformer_layer_config": layer, "draft_vocab_size": c.draft_vocab_size, **extra, "torch_dtype": dtype,
            "speculators_config": {
                "algorithm": "eagle3",
                "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": int(speculative_tokens),
                                      "verifier_accept_k": 1, "accept_tolerance": 0.0}],
                "default_proposal_method": "greedy",
                "verifier": {"name_or_path": verifier, "architectures": list(verifier_architectures)},
            },
        }
        tensors = _tensors(head, DTYPES[dtype], "layers.0.")
        tensors["embed_tokens.weight"] = embedding.detach().cpu().to(DTYPES[dtype]).contiguous()

    def fill(staged: Path) -> None:
        (staged / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, str(staged / WEIGHTS), metadata={"format": "pt"})

    return checkpoint.write_directory(directory, fill)


def read(directory, model, *, check_base_model: bool = True) -> tuple[Eagle3Head, dict]:
    """(head, metadata) of an EAGLE-3 head in `directory`: specdec's checkpoint (kind `KIND`) or an
    engine layout (`load`), checked against `model`."""
    if foreign(directory):
        return load(directory, model), {}
    ckpt = checkpoint.load(directory, KIND, model, check_base_model=check_base_model)
    return checkpoint.instantiate(ckpt, lambda **config: build(model, **config), directory), ckpt.metadata


def load(directory, model) -> Eagle3Head:
    """An EAGLE-3 head stored in the SpecForge or speculators layout, checked against `model`:
    its hidden size, vocabulary and aux layer ids, and every weight's name and shape."""
    directory = Path(directory)
    where = f"EAGLE-3 head {str(directory)!r}"
    config = checkpoint.read_config(directory, CONFIG, where)
    _, tensors = checkpoint.read_weights(directory, (WEIGHTS, "pytorch_model.bin"), where)
    if config.get("speculators_model_type") is not None:
        if config["speculators_model_type"] != "eagle3":
            raise checkpoint.CheckpointError(f"{where} is a speculators {config['speculators_model_type']!r} model; "
                                             "only eagle3 speculators load as Eagle heads")
        layer = dict(config.get("transformer_layer_config") or {})
        tensors = {("midlayer." + k[len("layers.0."):] if k.startswith("layers.0.") else k): v
                   for k, v in tensors.items()}
    else:
        layer = config
        if not any("Eagle3" in a for a in config.get("architectures") or []):
            raise checkpoint.CheckpointError(f"{where}: config.json's architectures {config.get('architectures')} name "
                                             "no EAGLE-3 model (e.g. LlamaForCausalLMEagle3)")
    nested = config.get("eagle_config") or {}
    num_layers = int(model.config.num_hidden_layers)
    aux = config.get(AUX_KEY) or nested.get(AUX_KEY) or list(default_aux_layers(num_layers))
    vocab = model.get_output_embeddings().weight.shape[0]
    if int(layer.get("vocab_size", vocab)) != vocab:
        raise checkpoint.CheckpointError(f"{where} was made for a vocabulary of {layer.get('vocab_size')} tokens but "
                                         f"the target has {vocab}; use a head trained for this target")
    draft = int(config.get("draft_vocab_size") or layer.get("draft_vocab_size") or vocab)
    if "d2t" not in tensors:
        if draft != vocab:
            raise checkpoint.CheckpointError(f"{where} has a draft vocabulary of {draft} tokens but no d2t map to the "
                                             "target's ids; re-export it with its d2t tensor")
        tensors["d2t"] = torch.zeros(vocab, dtype=torch.long)
    tensors.pop("embed_tokens.weight", None)  # the target's embedding is used, as engines share it
    heads = int(layer.get("num_attention_heads", model.config.num_attention_heads))
    try:
        head = build(model, hidden_size=int(layer.get("hidden_size", model.config.hidden_size)),
                     intermediate_size=int(layer.get("intermediate_size", model.config.intermediate_size)),
                     num_attention_heads=heads, num_key_value_heads=int(layer.get("num_key_value_heads", heads)),
                     head_dim=int(layer.get("head_dim") or int(layer.get("hidden_size", 0)) // heads),
                     draft_vocab_size=draft, aux_layers=[int(i) for i in aux],
                     norm_before_residual=bool(config.get("norm_before_residual", False)))
    except ValueError as e:
        raise checkpoint.CheckpointError(f"{where}: {e}") from None
    d2t = tensors["d2t"].long()
    if d2t.shape != (draft,):
        raise checkpoint.CheckpointError(f"{where}: d2t has shape {tuple(d2t.shape)}, not [{draft}]")
    ids = torch.arange(draft) + d2t
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise checkpoint.CheckpointError(f"{where}: d2t maps draft tokens outside the target's vocabulary of {vocab}")
    tensors["d2t"] = d2t
    tensors.setdefault("t2d", torch.zeros(vocab, dtype=torch.bool).index_fill_(0, ids, True))
    tensors["t2d"] = tensors["t2d"].bool()
    want = head.state_dict()
    missing, unknown = sorted(set(want) - set(tensors)), sorted(set(tensors) - set(want))
    wrong = [f"{k} {tuple(tensors[k].shape)} (want {tuple(want[k].shape)})" for k in want
             if k in tensors and tensors[k].shape != want[k].shape]
    if missing or unknown or wrong:
        raise checkpoint.CheckpointError(
            f"{where} does not hold an EAGLE-3 head of its config: " + "; ".join(
                part for part in (f"missing {missing}" if missing else "", f"unexpected {unknown}" if unknown else "",
                                  f"wrong shapes {wrong}" if wrong else "") if part))
    head.load_state_dict({k: v.to(want[k].dtype) for k, v in tensors.items()})
    return head


def exporter(layout: str):
    """`specdec export`'s writer for `layout`: (Eagle drafter with an `Eagle3Head`, directory,
    verifier) -> the directory; the target's architectures come from the drafter's model."""

    def write(drafter, directory, verifier: str | None = None) -> Path:
        if not isinstance(drafter.head, Eagle3Head):
            raise ValueError("this head is an EAGLE-1/2 feature head, which no serving engine loads; train an "
                             "EAGLE-3 head (specdec train eagle3) to export it")
        config = drafter.model.config
        return export(drafter.head, directory, layout, verifier=verifier or str(config.name_or_path or ""),
                      verifier_architectures=tuple(config.architectures or ()),
                      embedding=drafter.model.get_input_embeddings().weight)

    return write
