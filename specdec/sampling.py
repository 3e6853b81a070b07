"""Sampling settings as ``model.generate`` applies them: temperature, top-k, top-p, min-p.

`sampling_processors` builds the same transformers warpers, in the same order and with the same
defaults, that ``model.generate(do_sample=True, ...)`` adds after the model's other logits
processors (checked against transformers 5.24's ``_get_logits_processor``): an argument left
None falls back to ``model.generation_config``, then to transformers' default (top_k = 50).
The verifier applies them to every tree node with that node's own context, and
`specdec.acceptance.Speculative` samples from the result.

Boundary: core level; transformers' public processor classes only.
"""

from __future__ import annotations

from transformers import (
    LogitsProcessorList,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

# transformers' values for fields neither the caller nor the model's generation config sets
# (GenerationConfig._get_default_generation_params in 5.24).
HF_DEFAULTS = {"temperature": 1.0, "top_k": 50, "top_p": 1.0, "min_p": None}


def _setting(model, name: str, value):
    if value is not None:
        return value
    configured = getattr(model.generation_config, name, None)
    return configured if configured is not None else HF_DEFAULTS[name]


def sampling_processors(
    model, temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
    min_p: float | None = None,
) -> LogitsProcessorList:
    temperature = _setting(model, "temperature", temperature)
    top_k, top_p, min_p = (
        _setting(model, "top_k", top_k),
        _setting(model, "top_p", top_p),
        _setting(model, "min_p", min_p),
    )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for sampling, got {temperature}; use do_sample=False for greedy")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 turns it off), got {top_k}")
    warpers = LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k != 0:
        warpers.append(TopKLogitsWarper(top_k=top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=top_p))
    if min_p is not None:
        warpers.append(MinPLogitsWarper(min_p=min_p))
    return warpers


def temperature_kwargs(temperature: float) -> dict:
    """Arguments for both ``model.generate`` and `specdec.generate` from one temperature knob:
    0 is greedy, above it sampling with transformers' other defaults (top_k 50)."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    return {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
