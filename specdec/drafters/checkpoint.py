"""Save and load trained drafters: ``drafter_config.json`` + ``drafter.safetensors`` in one directory.

The JSON names the drafter kind, the target it was trained for (base model, hidden size,
vocabulary, layer count), the drafter's config and free-form metadata. Loading refuses a target
mismatch with a message naming both sides (a drafter for another model is exact but useless).
Every dimension the config stores must equal the recorded target's; weights that do not fit the
module built from the config are a corrupt checkpoint (`instantiate`). Saving is atomic: files
go to a temporary sibling directory that is renamed into place (`write_directory`). Shipped
drafters live in ``specdec/drafters/shipped/<base model>/<kind>/``; `shipped()` finds them.

Boundary: files and validation only; drafter classes build themselves from a `Checkpoint`.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

CONFIG_NAME = "drafter_config.json"
WEIGHTS_NAME = "drafter.safetensors"
FORMAT_VERSION = 1
SHIPPED_DIR = Path(__file__).resolve().parent / "shipped"
DIMENSIONS = ("hidden_size", "vocab_size")  # target dimensions a drafter config may store too
M = TypeVar("M")


class CheckpointError(ValueError):
    """A drafter checkpoint is missing, corrupt, or made for another target or drafter kind."""


@dataclass(frozen=True)
class Checkpoint:
    kind: str  # the drafter, e.g. "medusa"
    target: dict  # base_model, hidden_size, vocab_size, num_hidden_layers of the model it was trained for
    config: dict  # the drafter's constructor arguments
    tensors: dict[str, Tensor]
    metadata: dict = field(default_factory=dict)  # training record and measured accuracy


def base_model_name(model) -> str:
    """The name a checkpoint records for its target: the last component of the path or hub id
    the model was loaded from (an embedded model's converted directory is named after it, e.g.
    ``smollm2-135m``); empty for a model built in memory."""
    return Path(str(getattr(model.config, "name_or_path", "") or "")).name


def describe(model) -> dict:
    """What a checkpoint records about its target, and checks again on load."""
    cfg = model.config
    return {
        "base_model": base_model_name(model),
        "hidden_size": int(cfg.hidden_size),
        "vocab_size": int(model.get_output_embeddings().out_features),
        "num_hidden_layers": int(cfg.num_hidden_layers),
    }


def fingerprint(model) -> list[float]:
    """[sum, sum of absolute values] of the decoder's weights in float64: tells a target whose
    decoder was fine-tuned (a Medusa-2 checkpoint's LoRA merged in) from the original."""
    params = [p.detach().double() for p in model.get_decoder().parameters()]
    return [float(sum(p.sum() for p in params)), float(sum(p.abs().sum() for p in params))]


def same_fingerprint(a, b) -> bool:
    return all(abs(x - y) <= 1e-9 * max(1.0, abs(x), abs(y)) for x, y in zip(a, b, strict=True))


def write_directory(directory, fill: Callable[[Path], None]) -> Path:
    """Create or replace `directory` atomically: `fill` writes the contents into a temporary
    sibling directory, which is then renamed into place. Shared by drafter checkpoints and the
    draft models `specdec train draft-model` saves."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    old = None
    try:
        fill(staged)
        if directory.exists():
            # Two renames: the old directory moves aside before the new one moves in, so the
            # destination is always either the whole old contents or the whole new ones.
            old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=directory.parent))
            os.rename(directory, old / "d")
        os.rename(staged, directory)
    except BaseException:
        if old is not None and not directory.exists():
            os.rename(old / "d", directory)
        shutil.rmtree(staged, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return directory


def save(directory, checkpoint: Checkpoint) -> Path:
    """Write `checkpoint` to `directory` atomically, replacing what was there."""

    def fill(staged: Path) -> None:
        header = {"format_version": FORMAT_VERSION, "drafter": checkpoint.kind, "target": checkpoint.target,
                  "config": checkpoint.config, "metadata": checkpoint.metadata}
        (staged / CONFIG_NAME).write_text(json.dumps(header, indent=2) + "\n")
        save_file({k: v.detach().contiguous().cpu() for k, v in checkpoint.tensors.items()}, str(staged / WEIGHTS_NAME))

    return write_directory(directory, fill)


def _read_header(directory: Path) -> dict:
    if not directory.is_dir():
        raise CheckpointError(f"drafter checkpoint {str(directory)!r} does not exist (expected a directory with "
                              f"{CONFIG_NAME} and {WEIGHTS_NAME})")
    missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if not (directory / n).is_file()]
    if missing:
        raise CheckpointError(f"drafter checkpoint {str(directory)!r} is missing {', '.join(missing)}; "
                              "re-save it with save_pretrained or retrain it")
    try:
        header = json.loads((directory / CONFIG_NAME).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"drafter checkpoint {str(directory)!r} is corrupt: {CONFIG_NAME} is not valid JSON "
                              f"({e}); re-save it with save_pretrained or retrain it") from None
    keys = {"format_version", "drafter", "target", "config"}
    if not isinstance(header, dict) or not keys <= header.keys():
        raise CheckpointError(f"drafter checkpoint {str(directory)!r} is corrupt: {CONFIG_NAME} lacks "
                              f"{sorted(keys - set(header) if isinstance(header, dict) else keys)}")
    if not isinstance(header["target"], dict) or not isinstance(header["config"], dict):
        raise CheckpointError(f"drafter checkpoint {str(directory)!r} is corrupt: its target and config in "
                              f"{CONFIG_NAME} must be JSON objects")
    if header["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"drafter checkpoint {str(directory)!r} has format version {header['format_version']}; "
                              f"this specdec reads version {FORMAT_VERSION}")
    return header


def header_of(directory) -> dict:
    """A checkpoint directory's `CONFIG_NAME` contents (drafter kind, target, config, metadata),
    checked for form; the tensors are not read."""
    return _read_header(Path(directory))


def check_target(saved: dict, model, where: str, *, check_base_model: bool = True) -> None:
    """Refuse a checkpoint made for another target, naming the field and both values."""
    have = describe(model)
    for key in ("hidden_size", "vocab_size", "num_hidden_layers"):
        if saved.get(key) != have[key]:
            raise CheckpointError(
                f"{where} was trained for a target with {key}={saved.get(key)} (base model "
                f"{saved.get('base_model')!r}) but this model has {key}={have[key]}; load it with the model it was "
                "trained for, or train a drafter for this one (specdec train ...)"
            )
    # A model built in memory has no name to compare; the sizes above still had to match.
    if check_base_model and have["base_model"] and saved.get("base_model") != have["base_model"]:
        raise CheckpointError(
            f"{where} was trained for base model {saved.get('base_model')!r} but this model is "
            f"{have['base_model']!r}; pass check_base_model=False if they are the same network under two names"
        )


def load(directory, kind: str, model, *, check_base_model: bool = True) -> Checkpoint:
    """Read and validate a checkpoint of drafter `kind` for target `model`."""
    directory = Path(directory)
    header = _read_header(directory)
    where = f"drafter checkpoint {str(directory)!r}"
    if header["drafter"] != kind:
        raise CheckpointError(f"{where} holds a {header['drafter']!r} drafter, not {kind!r}; "
                              f"load it with the {header['drafter']!r} drafter's from_pretrained")
    check_target(header["target"], model, where, check_base_model=check_base_model)
    for key in DIMENSIONS:
        stored = header["config"].get(key)
        if stored is not None and stored != header["target"][key]:
            raise CheckpointError(f"{where} is corrupt: its config says {key}={stored} but the target it was saved "
                                  f"for (and its weights) have {key}={header['target'][key]}; re-save it with "
                                  "save_pretrained or retrain it")
    try:
        tensors = load_file(str(directory / WEIGHTS_NAME))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{where} is corrupt: {WEIGHTS_NAME} cannot be read ({e}); "
                              "re-save it with save_pretrained or retrain it") from None
    return Checkpoint(kind, header["target"], header["config"], tensors, header.get("metadata") or {})


def read_config(directory: Path, name: str, where: str) -> dict:
    """The JSON object in `directory`/`name` (another framework's config), or a clear error."""
    try:
        config = json.loads((directory / name).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{where} is corrupt: {name} is not valid JSON ({e}); download or export it again") \
            from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{where} is corrupt: {name} is not a JSON object")
    return config


def read_weights(directory: Path, names: tuple[str, ...], where: str) -> tuple[str, dict[str, Tensor]]:
    """(file name, tensors) of the first of `names` (safetensors, or a pickled state dict read with
    ``weights_only``) present in `directory`, or a clear error."""
    name = next((n for n in names if (directory / n).is_file()), None)
    if name is None:
        raise CheckpointError(f"{where} has config.json but no weights ({' or '.join(names)}); download or export "
                              "it again")
    try:
        if name.endswith(".safetensors"):
            tensors = load_file(str(directory / name))
        else:
            tensors = torch.load(directory / name, map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, ValueError, pickle.UnpicklingError) as e:
        raise CheckpointError(f"{where} is corrupt: {name} cannot be read ({e}); download or export it again") from None
    if not isinstance(tensors, dict) or not all(isinstance(v, Tensor) for v in tensors.values()):
        raise CheckpointError(f"{where} is corrupt: {name} is not a dict of tensors; download or export it again")
    return name, tensors


def instantiate(ckpt: Checkpoint, build: Callable[..., M], directory) -> M:
    """``build(**ckpt.config)`` with `ckpt.tensors` loaded into it (an `nn.Module` constructor);
    a config the constructor refuses, or weights that do not fit it, mean `directory` holds a
    corrupt checkpoint."""
    try:
        module = build(**ckpt.config)
        module.load_state_dict(ckpt.tensors)
    except (TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"drafter checkpoint {str(directory)!r} is corrupt: its weights do not "
                              f"match its config ({e})") from None
    return module


def available(root: Path = SHIPPED_DIR) -> list[tuple[str, str]]:
    """(base model, kind) of every shipped drafter."""
    if not root.is_dir():
        return []
    return sorted((d.parent.name, d.name) for d in root.glob("*/*") if (d / CONFIG_NAME).is_file())


def shipped(kind: str, model, root: Path = SHIPPED_DIR) -> Path:
    """Directory of the shipped `kind` drafter for `model` (matched by base model name)."""
    name = base_model_name(model)
    directory = root / name / kind
    if name and (directory / CONFIG_NAME).is_file():
        return directory
    have = ", ".join(f"{k} for {m}" for m, k in available(root)) or "none"
    raise CheckpointError(
        f"no shipped {kind!r} drafter for base model {name or '(unnamed model built in memory)'!r} "
        f"(shipped: {have}); train one with `specdec train {kind} --model ...` and load it with "
        f"from_pretrained(output_dir, model)"
    )
