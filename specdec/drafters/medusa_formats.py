"""Medusa heads in other frameworks' layouts: vLLM's (written and read) and FasterDecoding's (read).

vLLM (``vllm/model_executor/models/medusa.py``): ``config.json`` (``model_type: "medusa"``,
``num_heads``, ``num_hidden_layers``, ``truncated_vocab_size``, ``original_lm_head``,
``medusa_fc_bias``, ...) and ``model.safetensors``: per head h and layer l a linear named by
`vllm_block` (``x + SiLU(W x + b)``, specdec's `ResBlock`), then ``lm_heads.{h}.weight``, or with
``original_lm_head`` one lm_head for every head from ``lm_heads.0.weight`` (a copy, not tied to
the served target). ``token_map`` (when ``truncated_vocab_size < vocab_size``): the token ids the
heads score, -inf elsewhere. FasterDecoding (``medusa_lm_head.pt``): ``{h}.{l}.linear.weight``
and ``.bias``, ``{h}.{num_layers}.weight``. Reading checks every tensor against the target.

Boundary: files and key names; `Medusa.from_pretrained` reads through `read` when `layout` finds
one of these layouts; `export_medusa_vllm` writes with `checkpoint.write_directory` (atomic).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from specdec.drafters import checkpoint
from specdec.drafters.checkpoint import CheckpointError
from specdec.drafters.medusa import KIND, Medusa, lm_head_of
from specdec.drafters.vocab import rows

CONFIG = "config.json"  # vLLM's and FasterDecoding's config file
WEIGHTS = "model.safetensors"  # what the exporter writes; vLLM also reads pytorch_model.bin
VLLM_WEIGHTS = (WEIGHTS, "pytorch_model.bin")
FASTERDECODING_WEIGHTS = ("medusa_lm_head.safetensors", "medusa_lm_head.pt")
RECORD = "specdec"  # config.json key with the target and training record (vLLM keeps it as an unused attribute)


def vllm_block(h: int, i: int, part: str) -> str:
    """vLLM's key of head `h`'s residual layer `i` `part` ("weight" or "bias")."""
    return ".".join(("blocks", str(h), "layers", str(i), part))


def layout(directory) -> str | None:
    """ "vllm" or "fasterdecoding" for a directory in that layout, None otherwise (specdec's own
    checkpoint, whose ``drafter_config.json`` wins, or not a Medusa checkpoint at all)."""
    directory = Path(directory)
    if (directory / checkpoint.CONFIG_NAME).is_file() or not (directory / CONFIG).is_file():
        return None
    config = _config(directory)
    if config.get("model_type") == "medusa":
        return "vllm"
    return "fasterdecoding" if "medusa_num_heads" in config else None


def _config(directory: Path) -> dict:
    return checkpoint.read_config(directory, CONFIG, f"Medusa checkpoint {str(directory)!r}")


def _count(config: dict, keys: tuple[str, ...], where: str, default: int | None = None) -> int:
    """The first of `keys` in `config` (or `default`) as an int >= 1."""
    value = next((config[k] for k in keys if k in config), default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CheckpointError(
            f"{where}: {CONFIG} needs {keys[0]} as an int >= 1, got {value!r}; download or export it again"
        )
    return value


def read(directory, model, *, check_base_model: bool = True) -> tuple[checkpoint.Checkpoint, Tensor | None]:
    """A vLLM- or FasterDecoding-layout directory as a specdec Medusa checkpoint for `model`, and
    its draft vocabulary (vLLM's ``token_map``) or None. Heads whose lm_heads equal the target's
    rows (at the less precise of the two dtypes) become heads that share the target's lm_head;
    any other lm_heads are the heads' own."""
    directory = Path(directory)
    kind, config = layout(directory), _config(directory)
    hidden, vocab = int(model.config.hidden_size), int(model.get_output_embeddings().out_features)
    if kind == "vllm":
        where = f"vLLM Medusa checkpoint {str(directory)!r}"
        for key, have in (("hidden_size", hidden), ("vocab_size", vocab)):
            if config.get(key) != have:
                raise CheckpointError(
                    f"{where}: {CONFIG} says {key}={config.get(key)!r} but this model has "
                    f"{key}={have}; load it with the model its heads were trained for"
                )
        if config.get("logit_scale", 1.0) != 1.0:
            raise CheckpointError(
                f"{where}: {CONFIG} sets logit_scale={config['logit_scale']!r}; specdec's heads have "
                "no logit scale (remove it, or fold it into the lm_heads' weights)"
            )
        record = config.get(RECORD) if isinstance(config.get(RECORD), dict) else {}
        if record.get("target"):
            checkpoint.check_target(record["target"], model, where, check_base_model=check_base_model)
        num_heads = _count(config, ("num_heads", "medusa_num_heads"), where)
        num_layers = _count(config, ("num_hidden_layers", "medusa_num_layers"), where, default=1)  # vLLM's default
        truncated = config.get("truncated_vocab_size") or vocab
        if isinstance(truncated, bool) or not isinstance(truncated, int) or not 1 <= truncated <= vocab:
            raise CheckpointError(
                f"{where}: {CONFIG} needs truncated_vocab_size in [1, vocab_size={vocab}], got "
                f"{truncated!r}; download or export it again"
            )
        file, tensors = checkpoint.read_weights(directory, VLLM_WEIGHTS, where)
        tensors = {k.removeprefix("medusa_heads."): v for k, v in tensors.items()}  # as vLLM's load_weights does
        original = bool(config.get("original_lm_head", False))
        if original and "lm_heads.0.weight" not in tensors and "lm_head.weight" in tensors:
            tensors["lm_heads.0.weight"] = tensors["lm_head.weight"]  # vLLM's own parameter name also loads
        fc_bias = bool(config.get("medusa_fc_bias", False))
        token_map = None
        if truncated < vocab:  # vLLM uses token_map only then, and requires it
            token_map = _token_map(tensors.get("token_map"), truncated, vocab, f"{where}: {file}")
        metadata = record.get("metadata") or {}
        block = vllm_block

        def lm_key(h: int) -> str:
            return "lm_heads.0.weight" if original else f"lm_heads.{h}.weight"
    else:
        where = f"FasterDecoding Medusa checkpoint {str(directory)!r}"
        num_heads = _count(config, ("medusa_num_heads",), where)
        num_layers = _count(config, ("medusa_num_layers",), where, default=1)
        file, tensors = checkpoint.read_weights(directory, FASTERDECODING_WEIGHTS, where)
        fc_bias, token_map, metadata = True, None, {}

        def block(h: int, i: int, part: str) -> str:
            return f"{h}.{i}.linear.{part}"

        def lm_key(h: int) -> str:
            return f"{h}.{num_layers}.weight"

    ours, draft_vocab = _heads(
        tensors, model, f"{where}: {file}", num_heads, num_layers, fc_bias, block, lm_key, token_map
    )
    own = any(k.startswith("lm_heads.") for k in ours)
    cfg = {
        "hidden_size": hidden,
        "num_heads": num_heads,
        "num_layers": num_layers,
        "vocab_size": vocab if own else None,
    }
    return checkpoint.Checkpoint(KIND, checkpoint.describe(model), cfg, ours, metadata), draft_vocab


def _token_map(ids, truncated: int, vocab: int, where: str) -> Tensor:
    if not isinstance(ids, Tensor) or ids.dim() != 1 or ids.numel() != truncated or ids.is_floating_point():
        raise CheckpointError(
            f"{where} needs 'token_map', a 1-D integer tensor of truncated_vocab_size={truncated} "
            f"token ids (got {'none' if ids is None else list(ids.shape)}); download or export it again"
        )
    ids = ids.long()
    if int(ids.min()) < 0 or int(ids.max()) >= vocab or ids.unique().numel() != truncated:
        raise CheckpointError(
            f"{where} holds a 'token_map' with token ids outside [0, {vocab}) or repeated; download or export it again"
        )
    return ids


def _heads(
    tensors: dict[str, Tensor],
    model,
    where: str,
    num_heads: int,
    num_layers: int,
    fc_bias: bool,
    block: Callable[[int, int, str], str],
    lm_key: Callable[[int], str],
    token_map: Tensor | None,
) -> tuple[dict[str, Tensor], Tensor | None]:
    """`MedusaHeads` state dict from a foreign layout's `tensors` (key names from `block` and
    `lm_key`), each shape checked against `model`, and the draft vocabulary (None: every row)."""
    hidden = int(model.config.hidden_size)
    weight, bias = lm_head_of(model)
    vocab = weight.shape[0]

    def take(key: str, shapes: list[tuple[int, ...]], what: str) -> Tensor:
        if key not in tensors:
            raise CheckpointError(
                f"{where} lacks {key!r} ({what}); the checkpoint is incomplete, download or export it again"
            )
        if tuple(tensors[key].shape) not in shapes:
            raise CheckpointError(
                f"{where} holds {key!r} with shape {list(tensors[key].shape)}, but {what} of this "
                f"model (hidden size {hidden}, vocabulary {vocab}) has shape "
                f"{' or '.join(str(list(s)) for s in shapes)}; use heads made for this model"
            )
        return tensors[key]

    ours = {}
    for h in range(num_heads):
        for i in range(num_layers):
            w = take(block(h, i, "weight"), [(hidden, hidden)], f"head {h}'s layer {i}")
            ours[f"blocks.{h}.{i}.linear.weight"] = w
            ours[f"blocks.{h}.{i}.linear.bias"] = (
                take(block(h, i, "bias"), [(hidden,)], f"head {h}'s layer {i} bias")
                if fc_bias
                else torch.zeros(hidden, dtype=w.dtype)
            )
    ids = None if token_map is None else token_map.to(weight.device)
    target = weight if ids is None else weight.index_select(0, ids)  # the rows the heads score, in token_map order
    heads = []
    for h in range(num_heads):
        shapes = [(vocab, hidden)] if ids is None else [(ids.numel(), hidden), (vocab, hidden)]
        w = take(lm_key(h), shapes, f"head {h}'s lm_head")
        heads.append(w if ids is None or w.shape[0] == ids.numel() else w.index_select(0, ids.cpu()))
    if bias is None and all(_same(w, target) for w in heads):
        return ours, None if token_map is None else token_map  # the target's own lm_head: shared, not copied
    if token_map is not None:
        raise CheckpointError(
            f"{where}: its lm_heads score a truncated vocabulary (token_map) with weights other than "
            "the target's lm_head rows; specdec scores a draft vocabulary only through the target's "
            "own lm_head, so it cannot load these heads"
        )
    return {**ours, **{f"lm_heads.{h}.weight": w for h, w in enumerate(heads)}}, None


def _same(saved: Tensor, target: Tensor) -> bool:
    """`saved` is `target` stored at its own precision: equal once both are in the less precise
    dtype (an lm_head exported in bf16 from a float32 target still is that target's)."""
    low = saved.dtype if saved.element_size() < target.element_size() else target.dtype
    return torch.equal(saved.to(device=target.device, dtype=low), target.to(low))


def export_medusa_vllm(medusa: Medusa, directory) -> Path:
    """Write `medusa`'s heads to `directory` in vLLM's Medusa layout (config.json +
    model.safetensors), atomically, replacing what was there; tensors keep their dtypes.

    Heads that share the target's lm_head get ``original_lm_head: true`` and one copy of its
    weight as ``lm_heads.0.weight`` (vLLM does not tie the draft to the served target); own
    lm_heads are written per head. A draft vocabulary becomes ``token_map`` +
    ``truncated_vocab_size`` with only its rows: vLLM scores exactly those tokens, while specdec
    also scores each request's context tokens, so vLLM's drafts can differ from specdec's (never
    its outputs). The target and training record (accuracy table) go under ``config["specdec"]``,
    so `Medusa.from_pretrained` gets the same drafter back. Refused: a Medusa-2 checkpoint (its
    decoder adapter has no place in the layout) and shared heads of a target whose lm_head has a
    bias (vLLM's Medusa lm_heads have none)."""
    heads, model = medusa.heads, medusa.model
    if medusa.backbone_lora:
        raise ValueError(
            "export_medusa_vllm: these are Medusa-2 heads, trained with a LoRA adapter on the target's "
            "decoder, and vLLM's Medusa layout has no place for the adapter; export Medusa-1 heads "
            "(specdec train medusa without --joint)"
        )
    weight, bias = lm_head_of(model)
    state = heads.state_dict()
    tensors = {
        vllm_block(h, i, p): state[f"blocks.{h}.{i}.linear.{p}"]
        for h in range(heads.num_heads)
        for i in range(heads.num_layers)
        for p in ("weight", "bias")
    }
    ids = medusa.draft_vocab
    if ids is not None and ids.numel() == weight.shape[0]:
        ids = None  # every token: vLLM ignores a token_map unless it truncates
    if heads.lm_heads is None:
        if bias is not None:
            raise ValueError(
                "export_medusa_vllm: the target's lm_head has a bias, which vLLM's Medusa lm_heads lack; "
                "heads that share it cannot be written in vLLM's layout"
            )
        tensors["lm_heads.0.weight"] = weight if ids is None else rows(weight, None, ids)[0]
        if ids is not None:
            tensors["token_map"] = ids.long()
    else:
        tensors.update({f"lm_heads.{h}.weight": state[f"lm_heads.{h}.weight"] for h in range(heads.num_heads)})
    vocab = int(weight.shape[0])
    config = {
        "model_type": "medusa",
        "architectures": ["MedusaModel"],
        "hidden_size": heads.hidden_size,
        "vocab_size": vocab,
        "num_heads": heads.num_heads,
        "num_hidden_layers": heads.num_layers,
        "truncated_vocab_size": vocab if ids is None else int(ids.numel()),
        "original_lm_head": heads.lm_heads is None,
        "medusa_fc_bias": True,
        RECORD: {"target": checkpoint.describe(model), "metadata": medusa.metadata},
    }

    def fill(staged: Path) -> None:
        (staged / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in tensors.items()},
            str(staged / WEIGHTS),
            metadata={"format": "pt"},
        )

    return checkpoint.write_directory(directory, fill)
