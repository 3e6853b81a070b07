"""Concrete drafters. Each is a plain object implementing `specdec.Drafter`.

Boundary: drafters import the core interfaces and `specdec.trees`; the core never imports them.
Drafter names (the CLI's) become objects at the edge, in `specdec.registry`.
"""

from __future__ import annotations

from specdec.drafters.compose import Fallback, Merge
from specdec.drafters.draft_model import DraftModel, QuantizedDraft
from specdec.drafters.eagle import Eagle
from specdec.drafters.early_exit import EarlyExit
from specdec.drafters.jacobi import Jacobi
from specdec.drafters.layer_skip import LayerSkip
from specdec.drafters.lookahead import Lookahead
from specdec.drafters.medusa import Medusa
from specdec.drafters.prompt_lookup import PromptLookup
from specdec.drafters.retrieval import Datastore, Retrieval
from specdec.drafters.token_recycling import TokenRecycling

__all__ = [
    "Datastore", "DraftModel", "Eagle", "EarlyExit", "Fallback", "Jacobi", "LayerSkip", "Lookahead", "Medusa", "Merge",
    "PromptLookup", "QuantizedDraft", "Retrieval", "TokenRecycling", "load",
]


# Trained drafters shipped inside the package (specdec/drafters/shipped/<base model>/<kind>/).
TRAINED = {"medusa": Medusa, "eagle": Eagle, "eagle3": Eagle, "early-exit": EarlyExit}


def load(kind: str, model, directory=None, **kwargs):
    """The trained `kind` drafter in checkpoint `directory`, or (None) the one shipped for
    `model` (matched by its base model name), e.g. ``load("medusa", model)``; a clear error lists
    what is shipped when nothing matches."""
    if kind not in TRAINED:
        raise ValueError(f"load: unknown trained drafter kind {kind!r}; choose from {', '.join(TRAINED)}")
    from specdec.drafters import checkpoint

    return TRAINED[kind].from_pretrained(directory or checkpoint.shipped(kind, model), model, **kwargs)
