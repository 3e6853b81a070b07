"""Fast CPU forwards over a few tokens: oneDNN-prepacked linear weights.

`PackedLinears(model)` reorders every fp32 CPU ``nn.Linear`` weight once into oneDNN's blocked
layout (a copy: the model is untouched) and, as a context manager, installs a `TorchFunctionMode`
that sends ``F.linear`` on those weights to oneDNN; for small row counts that beats MKL's sgemm
(docs/design.md, "Packing"). Anything else (other ops or tensors, autograd, float64, a weight
changed in place since packing) runs unchanged. Results differ from MKL's by float rounding only.
Where the copy does not fit in memory (`specdec.memory`) nothing is packed and one warning says
so. Off the CPU (or in another dtype) nothing is packable (`packable`), decided here only.

Boundary: torch and `specdec.memory`. Relies on ``torch.ops.mkldnn._reorder_linear_weight`` /
``_linear_pointwise`` (what inductor emits for frozen CPU linears); `available()` says whether
this torch build has them.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from specdec import memory

_LINEAR = torch.nn.functional.linear
log = logging.getLogger(__name__)


def available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def _packable(weight: Tensor) -> bool:
    return weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.dim() == 2


def packable(model: nn.Module) -> bool:
    """Whether `PackedLinears(model)` would pack anything: oneDNN is there and some linear weight
    is an fp32 matrix on the CPU (not on a GPU, not in bf16/fp16/fp64)."""
    return available() and any(_packable(m.weight) for m in model.modules() if isinstance(m, nn.Linear))


class _Route(TorchFunctionMode):
    def __init__(self, owner: PackedLinears):
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _LINEAR and not torch.is_grad_enabled():
            x, weight = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            packed = self.owner.lookup(weight)
            if packed is not None and x.dtype == torch.float32 and x.device.type == "cpu":
                return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
        return func(*args, **kwargs)


class PackedLinears:
    """``with PackedLinears(model): model(...)`` runs the model's fp32 linears through oneDNN.

    Built once per model and reused (packing the 1.5B model takes a few seconds). `enabled` is
    False where there is nothing to pack (no oneDNN, float64 or GPU weights): the context is a no-op.
    """

    def __init__(self, model: nn.Module, extra: Iterable[Tensor] = ()):
        """Packs `model`'s linear weights and the `extra` weight tensors ([out, in], e.g. a drafter's
        copied lm_head rows, used through ``F.linear`` outside any module)."""
        # id(weight) -> (weak ref to the weight, its version when packed, the packed copy)
        self._packed: dict[int, tuple[weakref.ref, int, Tensor]] = {}
        if available():
            weights = [m.weight for m in model.modules() if isinstance(m, nn.Linear)] + list(extra)
            weights = list({id(w): w for w in weights if _packable(w)}.values())
            needed = sum(w.numel() * w.element_size() for w in weights)
            fits, free = memory.fits(needed)
            if not fits:
                log.warning("specdec: not packing %s: the packed copy of its %d linear weights needs %s (and %s to "
                            "spare) but %s is available; its forwards stay on the stock path (exact, slower over "
                            "several tokens)", type(model).__name__, len(weights), memory.size(needed),
                            memory.size(memory.HEADROOM), memory.size(free))
                weights = []
            for weight in weights:
                self._pack(weight)
        self.enabled = bool(self._packed)
        self._modes: list[_Route] = []  # a stack, so nested `with` blocks work

    def _pack(self, weight: Tensor) -> Tensor:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
        self._packed[id(weight)] = (weakref.ref(weight), weight._version, packed)
        return packed

    def lookup(self, weight: Tensor) -> Tensor | None:
        entry = self._packed.get(id(weight))
        if entry is None or entry[0]() is not weight:
            return None
        if entry[1] != weight._version:  # changed in place (load_state_dict, an optimizer step): repack
            return self._pack(weight)
        return entry[2]

    def __enter__(self) -> PackedLinears:
        if self.enabled:
            self._modes.append(_Route(self))
            self._modes[-1].__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self._modes.pop().__exit__(*exc)


_BY_MODEL: weakref.WeakKeyDictionary[nn.Module, PackedLinears] = weakref.WeakKeyDictionary()


def packed_linears(model: nn.Module) -> PackedLinears:
    """The model's `PackedLinears`, built on first use and kept while the model lives."""
    packs = _BY_MODEL.get(model)
    if packs is None:
        packs = _BY_MODEL[model] = PackedLinears(model)
    return packs


class PackedRoute:
    """Picks the context for a forward over k new tokens: the model's packed linears when
    ``k >= packed_from`` (the crossover measured by `specdec.profile`), else the stock forward.
    ``packed_from=None`` never packs (and builds nothing)."""

    def __init__(self, model: nn.Module, packed_from: int | None, extra: Iterable[Tensor] = ()):
        """`extra`: more weights to pack (see `PackedLinears`); they make a route of its own,
        not the model's shared `packed_linears`."""
        self.packed_from = packed_from
        if packed_from is None:
            self._packs = None
        else:
            extra = list(extra)
            self._packs = PackedLinears(model, extra) if extra else packed_linears(model)

    def __call__(self, k: int) -> contextlib.AbstractContextManager:
        if self._packs is not None and k >= self.packed_from:
            return self._packs
        return contextlib.nullcontext()


# The crossover without a measured profile (docs/design.md, "Packing"); `specdec profile` or
# generate's first-use curve measures the real one.
DEFAULT_PACKED_FROM = 4


def default_crossover(model: nn.Module) -> int | None:
    """Without a measured profile: `DEFAULT_PACKED_FROM` where packing applies, else never."""
    return DEFAULT_PACKED_FROM if packable(model) else None


class Packing:
    """Which forwards of one generation run with packed linears. The runtime decides (`generate`
    builds one per call and hands it over as `Context.packing`); the verifier and the drafters only
    take routes from it. `packed_from`: "auto" gives each model its own crossover (`crossover(model)`:
    its measured profile's, else `default_crossover`); a token count packs every model's forwards
    over at least that many tokens; None packs nothing. A model with nothing packable (off the CPU,
    not float32) runs its stock forward whatever this says."""

    def __init__(self, packed_from: int | None | str = "auto",
                 crossover: Callable[[nn.Module], int | None] = default_crossover):
        if packed_from not in ("auto", None) and (
            not isinstance(packed_from, int) or isinstance(packed_from, bool) or packed_from < 1
        ):
            raise ValueError(f"packed_from must be 'auto', None or a token count >= 1, got {packed_from!r}")
        self.setting, self._crossover = packed_from, crossover
        self._known: weakref.WeakKeyDictionary[nn.Module, int | None] = weakref.WeakKeyDictionary()

    def packed_from(self, model: nn.Module) -> int | None:
        """From how many tokens `model`'s forwards run packed (None: never); looked up once per model."""
        if self.setting != "auto":
            return self.setting
        if model not in self._known:
            self._known[model] = self._crossover(model)
        return self._known[model]

    def route(self, model: nn.Module) -> PackedRoute:
        """The route for `model`'s forwards (its shared `packed_linears`)."""
        return PackedRoute(model, self.packed_from(model))
