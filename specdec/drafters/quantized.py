"""A dynamic-int8 copy of the target itself drafts for it: cheaper than the target, close to it.

`quantized_copy(model)` builds the copy module by module: every module object is new, the
non-linear parameters and buffers (embeddings, norms, rotary) are the target's own tensors, and
each ``nn.Linear`` becomes torch's dynamic int8 linear (int8 weights, fp32 activations quantized
per forward; fbgemm/x86) made straight from the target's weight, so no second fp32 copy ever
exists. `QuantizedDraft` is a `DraftModel` over that copy, built in `begin` and kept per target.

Uses ``torch.ao.nn.quantized.dynamic.Linear``: torch deprecates its quantized tensors in favour of
torchao, which is not a dependency (nor installed here); this module is the one place to change.
Boundary: CPU, float32 targets only (the kernels are CPU-only and take fp32 activations).
Cache rule: the activation scale is per tensor, so a token's draft logits depend a little on the
other rows of its forward and the incremental draft cache differs from a fresh one by rounding;
drafts only propose and the target verifies every token, so outputs stay exact.
"""

from __future__ import annotations

import copy
import warnings
import weakref

import torch
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig

from specdec import memory
from specdec.drafter import Context, Feedback
from specdec.drafters.draft_model import DraftModel, check_options
from specdec.trees import TokenTree

# scheme -> the weight/activation qconfig of every quantized linear
SCHEMES = {"int8": per_channel_dynamic_qconfig, "int8-per-tensor": default_dynamic_qconfig}
ENGINES = ("x86", "fbgemm")  # the quantized engines with fast dynamic int8 linears on x86 CPUs


def _check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"QuantizedDraft: unknown scheme {scheme!r}; choose from {', '.join(SCHEMES)}")


def _check_target(model, scheme: str) -> None:
    _check_scheme(scheme)
    supported = torch.backends.quantized.supported_engines
    if not any(e in supported for e in ENGINES):
        raise RuntimeError(f"QuantizedDraft: this torch build has no {' or '.join(ENGINES)} quantized engine "
                           f"(it has {', '.join(supported) or 'none'}); dynamic int8 drafting needs one: use "
                           "an x86 CPU build of torch or another drafter")
    if torch.backends.quantized.engine not in ENGINES:
        raise RuntimeError(f"QuantizedDraft: the quantized engine is {torch.backends.quantized.engine!r}; set "
                           "torch.backends.quantized.engine = 'x86' (or 'fbgemm') before drafting")
    param = next(model.parameters(), None)
    if param is not None and param.device.type != "cpu":
        raise ValueError(f"QuantizedDraft: the target is on {param.device}; dynamic int8 drafting is CPU-only "
                         "(torch has no GPU kernel for it): run the target on the CPU or pick another drafter")
    if param is not None and param.dtype != torch.float32:
        raise ValueError(f"QuantizedDraft: the target is {param.dtype}; the int8 copy shares the target's "
                         "embeddings and norms and takes float32 activations, so it needs a float32 target: "
                         "load it with torch_dtype=torch.float32 (or model.float())")
    if not any(isinstance(m, nn.Linear) for m in model.modules()):
        raise ValueError(f"QuantizedDraft: {type(model).__name__} has no nn.Linear to quantize; the drafter "
                         "needs a transformers causal LM with linear projections")


def quantized_copy(model, scheme: str = "int8", lm_head: bool = True):
    """A new module tree over `model`'s own non-linear tensors with each ``nn.Linear`` replaced by
    a dynamic int8 linear under `scheme` (`SCHEMES`); ``lm_head=False`` keeps the output
    projection fp32 (shared, not copied). `model` is left as it was. Clear errors for an engine,
    device, dtype or model this cannot quantize (see the module docstring)."""
    _check_target(model, scheme)
    qconfig = SCHEMES[scheme]
    keep = None if lm_head else getattr(model, "get_output_embeddings", lambda: None)()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and m is not keep]
    memory.require(sum(m.weight.numel() + 20 * m.out_features for m in linears), "QuantizedDraft's int8 copy",
                   "free memory, keep the lm_head fp32 (lm_head=False) or pick another drafter")

    def clone(module: nn.Module) -> nn.Module:
        if isinstance(module, nn.Linear) and module is not keep:
            shell = copy.copy(module)  # the same tensors: from_float gets its qconfig, the target none
            shell.qconfig = qconfig
            with warnings.catch_warnings():  # torch's deprecation of quantized tensors (module docstring)
                warnings.filterwarnings("ignore", message=".*quantized tensor creation.*deprecated")
                with torch.no_grad():
                    return DynamicLinear.from_float(shell)
        new = module.__class__.__new__(module.__class__)
        new.__dict__.update({k: v.copy() if isinstance(v, dict) else v for k, v in module.__dict__.items()})
        new._modules = {name: None if child is None else clone(child) for name, child in module._modules.items()}
        return new

    copied = clone(model).eval()
    # Its own profile key: the copy's forwards cost what int8 costs, not what the target's do.
    source = str(getattr(model, "name_or_path", "") or model.config.name_or_path or "")
    copied.name_or_path = f"{source}-{scheme}" if source else ""
    return copied


def quantized_bytes(draft_copy) -> int:
    """Bytes the dynamic int8 linears of `draft_copy` hold (int8 weights, per-channel or per-tensor
    scales and zero points, fp32 biases): what the copy adds to the target's memory."""
    total = 0
    for m in draft_copy.modules():
        if isinstance(m, DynamicLinear):
            w, b = m.weight(), m.bias()
            total += w.numel() * w.element_size()
            if w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
                total += w.q_per_channel_scales().numel() * 8 + w.q_per_channel_zero_points().numel() * 8
            else:
                total += 16
            total += 0 if b is None else b.numel() * b.element_size()
    return total


class QuantizedDraft:
    """Drafts with a dynamic int8 copy of the target (`quantized_copy`), as `DraftModel` does with a
    separate draft model (same options, same chain/tree drafting, same cache reconciliation). The
    copy is built in `begin` for each target it meets, kept while that target lives; `copy` and
    `copy_bytes` describe the current target's. Drafts stay `num_tokens` deep (`DraftModel`'s
    sizing), not yet sized by the copy's measured cost."""

    needs_hidden_states = False

    def __init__(
        self, scheme: str = "int8", *, lm_head: bool = True, num_tokens: int = 5, topk: int = 1,
        width: int | None = None, budget: int | None = None, window: int | None = None, min_confidence: float = 0.0,
    ):
        """`scheme`: a key of `SCHEMES`; `lm_head`: quantize the output projection too (False keeps
        it fp32, shared with the target: more agreement, slower on large vocabularies). The rest
        are `DraftModel`'s."""
        _check_scheme(scheme)
        check_options("QuantizedDraft", num_tokens, topk, window, min_confidence)
        self.scheme, self.lm_head = scheme, lm_head
        self._options = dict(num_tokens=num_tokens, topk=topk, width=width, budget=budget, window=window,
                             min_confidence=min_confidence)
        self._drafts: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # target -> DraftModel
        self._draft: DraftModel | None = None

    def __repr__(self) -> str:
        return f"QuantizedDraft({self.scheme!r}, lm_head={self.lm_head}, num_tokens={self._options['num_tokens']})"

    @property
    def copy(self):
        """The current target's int8 copy (after `begin`)."""
        if self._draft is None:
            raise RuntimeError("QuantizedDraft: no target yet; the copy is built by begin(target) (generate calls it)")
        return self._draft.model

    @property
    def copy_bytes(self) -> int:
        """Bytes of the current target's copy beyond the target's own (`quantized_bytes`)."""
        return quantized_bytes(self.copy)

    def begin(self, target) -> None:
        draft = self._drafts.get(target)
        if draft is None:
            draft = DraftModel(quantized_copy(target, self.scheme, self.lm_head), **self._options)
            self._drafts[target] = draft
        self._draft = draft
        draft.begin(target)

    def propose(self, ctx: Context) -> TokenTree:
        if self._draft is None:
            raise RuntimeError("QuantizedDraft: propose before begin(target); generate calls begin first")
        return self._draft.propose(ctx)

    def update(self, feedback: Feedback) -> None:
        if self._draft is None:
            raise RuntimeError("QuantizedDraft: update before begin(target); generate calls begin first")
        self._draft.update(feedback)
