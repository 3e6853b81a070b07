"""specdec: exact speculative and parallel decoding for Hugging Face causal LMs.

Public API re-exports only, resolved lazily (PEP 562) so that ``import specdec.trees`` does not
pay for importing transformers.
"""

from importlib import import_module

_EXPORTS = {
    "generate": "specdec.decode",
    "hf_generate": "specdec.decode",
    "GenerationStats": "specdec.decode",
    "StepInfo": "specdec.decode",
    "Verifier": "specdec.verifier",
    "Scores": "specdec.verifier",
    "Greedy": "specdec.acceptance",
    "Speculative": "specdec.acceptance",
    "Typical": "specdec.acceptance",
    "Guard": "specdec.guard",
    "Session": "specdec.session",
    "Decision": "specdec.acceptance",
    "AcceptanceRule": "specdec.acceptance",
    "Drafter": "specdec.drafter",
    "Context": "specdec.drafter",
    "Feedback": "specdec.drafter",
    "TokenTree": "specdec.trees",
    "load_model": "specdec.models",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'specdec' has no attribute {name!r}")
