"""The verify cost curve: how long one target forward over k new tokens takes on this machine.

The curve decides tree budgets and draft lengths (`specdec.trees.sizing`). `measure` times the
forward the verifier really runs (k tokens after a realistic KV cache, median of repeats), with
and without `specdec.packing` on the CPU. Curves are stored as JSON under the cache directory per
model, device type and dtype (`model_key`), valid only on the machine that measured them
(`machine_id`). `for_model` is what `generate` asks: the stored profile, or a short curve
measured on first use (SPECDEC_TUNE=0: not measured).

Boundary: core level; the model's public forward, `specdec.kv`, `specdec.packing`, `specdec.devices`.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import itertools
import json
import logging
import os
import platform
import statistics
import tempfile
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from specdec import devices, kv
from specdec.packing import Packing, default_crossover, packable, packed_linears
from specdec.trees import TokenTree, verify_inputs

log = logging.getLogger(__name__)

DEFAULT_KS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
# The short curve `for_model` measures on first use: the shape of the curve, in about 30 forwards.
FIRST_USE = dict(ks=(1, 2, 4, 8, 16, 32, 64), context=128, repeats=3)


@dataclass(frozen=True)
class CostCurve:
    """Seconds for one target forward over k new tokens (k in `ks`) after `context` cached tokens."""

    model: str
    method: str  # "packed" (oneDNN-prepacked linears) or "stock" (the model's own forward)
    ks: tuple[int, ...]
    seconds: tuple[float, ...]
    context: int
    threads: int
    machine: str

    def cost(self, k: int) -> float:
        """Forward time for k tokens, linearly interpolated (clamped to the measured range)."""
        if k <= self.ks[0]:
            return self.seconds[0]
        for (k0, s0), (k1, s1) in zip(zip(self.ks, self.seconds), zip(self.ks[1:], self.seconds[1:])):
            if k <= k1:
                return s0 + (s1 - s0) * (k - k0) / (k1 - k0)
        return self.seconds[-1] * k / self.ks[-1]

    def relative(self, k: int) -> float:
        return self.cost(k) / self.cost(1)


@functools.cache
def cpu_name() -> str:
    """The CPU model (e.g. "AMD EPYC 9B14"): curves differ between CPUs of one architecture."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_id(device: torch.device | str = "cpu") -> str:
    """What a curve measured on `device` is valid for: the CPU, its torch threads and the torch
    version, and off the CPU the accelerator's name (a CUDA step also pays the host's launches)."""
    device = torch.device(device)
    host = f"{cpu_name()} x{torch.get_num_threads()} torch {torch.__version__}"
    if device.type == "cpu":
        return host
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return f"{name} ({device.type}) on {host}"


@torch.no_grad()
def measure(
    model,
    name: str,
    *,
    ks=DEFAULT_KS,
    context: int = 300,
    repeats: int = 5,
    packed: bool = True,
    seed: int = 0,
    progress: bool = False,
) -> CostCurve:
    """Median time of a k-token verify forward (a chain: the tree mask costs the same) after
    `context` cached tokens; the cache is cropped back after each forward so every k sees the same."""
    if context < 1 or repeats < 1 or not ks or min(ks) < 1:
        raise ValueError("context, repeats and every k must be >= 1")
    vocab = model.get_output_embeddings().out_features
    device = model.device
    gen = torch.Generator().manual_seed(seed)  # tokens drawn on the host: the same on every device
    prompt = torch.randint(vocab, (context,), generator=gen)
    packs = packed_linears(model) if packed else None
    method = "packed" if packs is not None and packs.enabled else "stock"
    route = packs if method == "packed" else contextlib.nullcontext()
    cache = kv.new_cache(model)
    seconds = []
    with route:
        model(input_ids=prompt[None].to(device), **kv.cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
        for k in tqdm(ks, desc=f"{name}, {method} forward, k", disable=not progress):
            tree = TokenTree.chain(torch.randint(vocab, (k - 1,), generator=gen).tolist())
            inputs = verify_inputs(int(prompt[-1]), tree, context, model.dtype, device)
            times = []
            for _ in range(repeats + 1):  # the first run warms up allocations for this shape
                t0 = devices.clock(device)
                model(
                    input_ids=inputs.input_ids,
                    position_ids=inputs.position_ids,
                    **kv.cache_kwargs(model, cache),
                    use_cache=True,
                )
                times.append(devices.clock(device) - t0)  # the forward has run, not just been queued
                kv.drop_last(cache, k)
            seconds.append(statistics.median(times[1:]))
    return CostCurve(name, method, tuple(ks), tuple(seconds), context, torch.get_num_threads(), machine_id(device))


@dataclass(frozen=True)
class Profile:
    """Both curves for one model on one machine, and the forward plan they imply."""

    stock: CostCurve
    packed: CostCurve | None  # None where packing is unavailable (no oneDNN, not float32, not on the CPU)

    @property
    def packed_from(self) -> int | None:
        """Smallest measured k from which the packed forward is at least as fast for every larger k."""
        if self.packed is None or self.packed.method != "packed":
            return None
        best = None
        for k, s_stock, s_packed in reversed(list(zip(self.stock.ks, self.stock.seconds, self.packed.seconds))):
            if s_packed > s_stock:
                break
            best = k
        return best

    def forward_cost(self, packed_from: int | None) -> Callable[[int], float]:
        """Seconds of a forward over k new tokens on the path the verifier takes (packed for
        k >= `packed_from`), non-decreasing in k: a running maximum over the measured points. A
        forward over more tokens is never really cheaper; dips are timing noise or kernel quirks
        that a drafter should not plan on."""
        ks = sorted(set(self.stock.ks) | {1})

        def routed(k: int) -> float:
            packed = self.packed is not None and packed_from is not None and k >= packed_from
            return (self.packed if packed else self.stock).cost(k)

        envelope = list(itertools.accumulate((routed(k) for k in ks), max))

        def cost(k: int) -> float:
            i = bisect.bisect_right(ks, k) - 1  # the last measured k' <= k
            return max(envelope[max(i, 0)], routed(k))

        return cost


def profile(model, name: str, **kwargs) -> Profile:
    """The stock curve, and the packed one where packing applies (`specdec.packing.packable`)."""
    stock = measure(model, name, packed=False, **kwargs)
    packed = measure(model, name, packed=True, **kwargs) if packable(model) else None
    return Profile(stock, packed if packed is not None and packed.method == "packed" else None)


def model_key(model) -> str:
    """Profiles are keyed by the directory or hub id the model was loaded from, its device type and
    its dtype ("smollm2-135m.cpu.float32"): a CPU curve never sizes trees for a CUDA or bf16 model.
    "" for a model with no source name (built in-process), which has no stored profile."""
    source = str(getattr(model, "name_or_path", "") or model.config.name_or_path or "")
    name = Path(source).name or source
    return f"{name}.{_placement(model)}" if name else ""


def _placement(model) -> str:
    return f"{model.device.type}.{str(model.dtype).removeprefix('torch.')}"


def profile_path(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / "profiles" / (key.replace("/", "--") + ".json")


def save(prof: Profile, path: Path) -> None:
    """Written to a temp file and renamed: a reader never sees half a profile."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(
            {"stock": asdict(prof.stock), "packed": None if prof.packed is None else asdict(prof.packed)}, f, indent=1
        )
    os.replace(tmp, path)


def _curve(data: dict) -> CostCurve:
    return CostCurve(**{**data, "ks": tuple(data["ks"]), "seconds": tuple(data["seconds"])})


def load(path: Path) -> Profile:
    st = Path(path).stat()
    # `save` renames a fresh temp file over the old one, so (inode, mtime, size) names a version.
    return _load(str(path), (st.st_ino, st.st_mtime_ns, st.st_size))


@functools.lru_cache(maxsize=32)
def _load(path: str, version: tuple) -> Profile:
    """Parsed once per file version: every `generate` call asks for its model's profile."""
    data = json.loads(Path(path).read_text())
    return Profile(_curve(data["stock"]), None if data["packed"] is None else _curve(data["packed"]))


def stored(model, cache_dir: Path) -> Profile | None:
    """This model's stored profile (for its device and dtype) if it was measured on this machine
    with this thread count."""
    key = model_key(model)
    path = profile_path(cache_dir, key) if key else None
    if path is None or not path.exists():
        return None
    try:
        prof = load(path)
    except (ValueError, KeyError, TypeError):
        return None  # unreadable: treated as absent, `specdec profile` rewrites it
    return prof if prof.stock.machine == machine_id(model.device) else None


def measures_on_first_use(device: torch.device) -> bool:
    """Whether `for_model` measures a missing curve by default: yes, on the CPU as off it (without
    a curve trees are sized by the default ``1 + 0.2 n`` and packing starts at the default
    crossover), unless the environment sets SPECDEC_TUNE=0; never on meta, where nothing runs."""
    return device.type != "meta" and os.environ.get("SPECDEC_TUNE", "1").strip() != "0"


# model -> (its placement and machine when measured, the profile): first-use profiles, once per model
# in a process, also for models without a key (nothing stored) or an unwritable cache directory.
_MEASURED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def for_model(model, cache_dir: Path, *, first_use: bool | None = None) -> Profile | None:
    """The verify cost profile `generate` sizes trees with: the stored one (`stored`), or one this
    process measured; else, when `first_use` (None: `measures_on_first_use(model.device)`), a short
    profile (`FIRST_USE`: about 30 forwards per curve, the packed curve where packing applies)
    measured now with a one-line notice and a progress bar, stored for the next process when the
    model has a key; else None."""
    prof = stored(model, cache_dir)
    if prof is not None:
        return prof
    here = (_placement(model), machine_id(model.device))
    known = _MEASURED.get(model)
    if known is not None and known[0] == here:
        return known[1]
    if not (measures_on_first_use(model.device) if first_use is None else first_use):
        return None
    key = model_key(model)
    log.warning("specdec: tuning to this machine once: measuring a short verify cost curve of %s on %s "
                "(`specdec profile` measures the full one; SPECDEC_TUNE=0 skips this)",
                key or type(model).__name__, model.device)
    prof = profile(model, key or type(model).__name__, progress=True, **FIRST_USE)
    if key:
        with contextlib.suppress(OSError):  # a read-only cache still keeps this process's curve
            save(prof, profile_path(cache_dir, key))
    _MEASURED[model] = (here, prof)
    return prof


def crossover(model, cache_dir: Path) -> int | None:
    """From how many tokens `model`'s forwards run packed: its profile's crossover (stored or
    measured in this process; this call never measures), else `packing.default_crossover`."""
    prof = for_model(model, cache_dir, first_use=False)
    return prof.packed_from if prof is not None else default_crossover(model)


def packing(packed_from: int | None | str, cache_dir: Path) -> Packing:
    """The runtime's `Packing` for one generation, "auto" taking each model's `crossover`."""
    return Packing(packed_from, functools.partial(crossover, cache_dir=cache_dir))


def table(curves: list[CostCurve]) -> str:
    """Markdown: one row per curve, k = 1 in ms, every k relative to the same model's stock k = 1
    (so the packed row shows both its own shape and how it compares)."""
    ks = curves[0].ks
    ref = {c.model: c.seconds[0] for c in curves if c.method == "stock"}
    lines = [
        "| model | method | time at k=1 | " + " | ".join(f"k={k}" for k in ks) + " |",
        "|---|---|---|" + "---|" * len(ks),
    ]
    for c in curves:
        base = ref.get(c.model, c.seconds[0])
        rel = " | ".join(f"{s / base:.2f}x" for s in c.seconds)
        lines.append(f"| {c.model} | {c.method} | {c.seconds[0] * 1e3:.0f} ms | {rel} |")
    return "\n".join(lines)
