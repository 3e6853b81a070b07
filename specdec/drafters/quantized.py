"""Dynamic-int8 copies of a causal LM: cheap drafts that stay close to the model they copy.

`quantized_copy(model)` builds the copy module by module: every module object is new, the
non-linear parameters and buffers (embeddings, norms, rotary) are the model's own tensors, and
each ``nn.Linear`` becomes torch's dynamic int8 linear (int8 weights, fp32 activations quantized
per forward; fbgemm/x86) made straight from the model's weight, so no second fp32 copy ever
exists. ``int8-smooth`` first moves activation outliers into the weights (SmoothQuant), from
input maxima seen on calibration tokens. `QuantizedDraft` and ``DraftModel(quantize=)`` use it.

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

import torch
from torch import Tensor, nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig

from specdec import memory

# scheme -> the weight/activation qconfig of every quantized linear
SCHEMES = {"int8": per_channel_dynamic_qconfig, "int8-per-tensor": default_dynamic_qconfig,
           "int8-smooth": per_channel_dynamic_qconfig}
SMOOTH_ALPHA = 0.5  # SmoothQuant's migration strength: scale s_j = max|x_j|^a / max|w_j|^(1 - a)
CALIBRATION_TOKENS = 512  # the most calibration tokens read (the last ones)
ENGINES = ("x86", "fbgemm")  # the quantized engines with fast dynamic int8 linears on x86 CPUs


def check_scheme(scheme: str, who: str = "QuantizedDraft") -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"{who}: unknown scheme {scheme!r}; choose from {', '.join(SCHEMES)}")


def check_target(model, scheme: str) -> None:
    check_scheme(scheme)
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


def _input_maxima(model, linears: dict[nn.Linear, str], calibration: Tensor) -> dict[str, Tensor]:
    """name -> max |input| per input channel of each of `linears` over one forward of `model` on
    the last `CALIBRATION_TOKENS` of `calibration` ([t] or [1, t] token ids)."""
    ids = calibration.reshape(-1)[-CALIBRATION_TOKENS:]
    if not ids.numel():
        raise ValueError("quantized_copy: calibration is empty; give the token ids of some representative text")
    seen: dict[str, Tensor] = {}

    def hook(module, args):
        x = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0)
        name = linears[module]
        seen[name] = torch.maximum(seen[name], x) if name in seen else x

    hooks = [m.register_forward_pre_hook(hook) for m in linears]
    try:
        with torch.no_grad():
            model(input_ids=ids[None].to(next(model.parameters()).device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return seen


class _Smoothed(nn.Module):
    """A quantized linear over SmoothQuant-scaled weights W * s: its input is divided by s first."""

    def __init__(self, linear: DynamicLinear, inv_scale: Tensor):
        super().__init__()
        self.linear = linear
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("inv_scale", inv_scale)  # [in_features] 1 / s

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x * self.inv_scale)


def _quantize(module: nn.Linear, qconfig, maxima: Tensor | None) -> nn.Module:
    """`module` as a dynamic int8 linear (SmoothQuant-scaled where `maxima` are given); `module` unchanged."""
    shell = copy.copy(module)  # the same tensors: from_float gets its qconfig, the target none
    shell._parameters = dict(module._parameters)  # so replacing the weight below leaves the target's
    shell.qconfig = qconfig
    scale = None
    if maxima is not None:
        w = module.weight.detach().abs().amax(0).clamp(min=1e-5)  # [in_features]
        scale = (maxima.clamp(min=1e-5) ** SMOOTH_ALPHA / w ** (1 - SMOOTH_ALPHA)).clamp(min=1e-5)
        shell.weight = nn.Parameter(module.weight.detach() * scale[None, :], requires_grad=False)
    with warnings.catch_warnings():  # torch's deprecation of quantized tensors (module docstring)
        warnings.filterwarnings("ignore", message=".*quantized tensor creation.*deprecated")
        with torch.no_grad():
            q = DynamicLinear.from_float(shell)
    return q if scale is None else _Smoothed(q, 1 / scale)


def quantized_copy(model, scheme: str = "int8", lm_head: bool = True, keep: tuple[str, ...] = (),
                   calibration: Tensor | None = None):
    """A new module tree over `model`'s own non-linear tensors with each ``nn.Linear`` replaced by
    a dynamic int8 linear under `scheme` (`SCHEMES`). ``lm_head=False`` keeps the output projection
    fp32, and `keep` the linears whose qualified names start with one of its prefixes (e.g.
    the first decoder layer's prefix); kept ones are shared, not copied. `calibration`: token ids that
    ``int8-smooth`` reads the activation maxima from (required there). `model` is left as it was.
    Clear errors for an engine, device, dtype or model this cannot quantize (see the module docstring)."""
    check_target(model, scheme)
    if scheme == "int8-smooth" and calibration is None:
        raise ValueError("quantized_copy: scheme 'int8-smooth' needs calibration token ids (a few hundred tokens of "
                         "representative text, e.g. the prompt); or use scheme 'int8'")
    head = None if lm_head else getattr(model, "get_output_embeddings", lambda: None)()
    linears = {m: name for name, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head
               and not any(name.startswith(k) for k in keep)}
    memory.require(sum(m.weight.numel() + 20 * m.out_features for m in linears), "QuantizedDraft's int8 copy",
                   "free memory, keep the lm_head fp32 (lm_head=False) or pick another drafter")
    maxima = _input_maxima(model, linears, calibration) if scheme == "int8-smooth" else {}
    qconfig = SCHEMES[scheme]

    def clone(module: nn.Module) -> nn.Module:
        if isinstance(module, nn.Linear):
            return _quantize(module, qconfig, maxima.get(linears[module])) if module in linears else module
        new = module.__class__.__new__(module.__class__)
        new.__dict__.update({k: v.copy() if isinstance(v, dict) else v for k, v in module.__dict__.items()})
        new._modules = {name: None if child is None else clone(child) for name, child in module._modules.items()}
        return new

    copied = clone(model).eval()
    # Its own profile key: the copy's forwards cost what int8 costs, not what the target's do.
    source = str(getattr(model, "name_or_path", "") or model.config.name_or_path or "")
    copied.name_or_path = f"{source}-{scheme}" if source else ""
    return copied


def model_bytes(model, shared_with=None) -> int:
    """Bytes `model` holds that `shared_with` (a model, or None) does not: its parameters and
    buffers not among `shared_with`'s, and its dynamic int8 linears' packed weights (int8 weights,
    per-channel or per-tensor scales and zero points, fp32 biases)."""
    shared = set() if shared_with is None else {
        t.data_ptr() for t in [*shared_with.parameters(), *shared_with.buffers()]}
    total, seen = 0, set()
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in shared and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    for m in model.modules():
        if isinstance(m, DynamicLinear):
            w, b = m.weight(), m.bias()
            total += w.numel() * w.element_size()
            if w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
                total += w.q_per_channel_scales().numel() * 8 + w.q_per_channel_zero_points().numel() * 8
            else:
                total += 16
            total += 0 if b is None else b.numel() * b.element_size()
    return total
