"""Concrete drafters. Each is a plain object implementing `specdec.Drafter`.

Boundary: drafters import the core interfaces and `specdec.trees`; the core never imports them.
`DRAFTERS` is the one place where drafter names become objects, used only at the CLI/demo edge.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from specdec.drafters.compose import Fallback, Merge
from specdec.drafters.draft_model import DraftModel
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
    "DRAFTERS", "Datastore", "DraftModel", "Eagle", "EarlyExit", "Fallback", "Jacobi", "LayerSkip", "Lookahead", "Medusa", "Merge",
    "PromptLookup", "Resources", "Retrieval", "TokenRecycling", "check_name", "datastore_dir", "load", "make_drafter",
]


@dataclass(frozen=True)
class Resources:
    """What a named drafter may be built from: the loaded target, an optional draft model, and
    an optional datastore directory (None: the target's default one, see `datastore_dir`)."""

    target: Any
    target_name: str | None = None  # the name the target was loaded by (for default datastores)
    draft: Any = None
    datastore: str | None = None


def datastore_dir(target_name: str | None) -> Path:
    """Where `specdec datastore build --model NAME` puts a model's datastore by default."""
    from specdec.models import cache_dir

    return cache_dir() / "datastores" / Path(target_name or "model").name


def _draft(r: Resources):
    if r.draft is None:
        raise ValueError("this drafter needs a draft model: pass --draft-model NAME (e.g. qwen2.5-coder-0.5b)")
    return r.draft


def _datastore(r: Resources) -> Datastore:
    path = Path(r.datastore) if r.datastore else datastore_dir(r.target_name)
    if not (path / "datastore.json").exists():
        raise ValueError(
            f"the retrieval drafter needs a datastore and {path} has none: build it with `specdec datastore "
            f"build --model {r.target_name or 'MODEL'} --corpus FILE` (or pass --datastore DIR)"
        )
    return Datastore.open(path)


DRAFTERS = {
    "prompt-lookup": lambda r: PromptLookup(),
    "prompt-lookup-tree": lambda r: PromptLookup(num_matches=3, budget=16),
    "token-recycling": lambda r: TokenRecycling(),
    "lookahead-pia": lambda r: Lookahead(),
    "jacobi": lambda r: Jacobi(),
    "retrieval": lambda r: Retrieval(_datastore(r)),
    "layer-skip": lambda r: LayerSkip(r.target),
    "medusa": lambda r: load("medusa", r.target),
    "medusa-full-vocab": lambda r: load("medusa", r.target, draft_vocab=None),  # every lm_head row: the A/B of the draft vocabulary
    "eagle": lambda r: load("eagle", r.target),
    "eagle-full-vocab": lambda r: load("eagle", r.target, draft_vocab=None),  # every lm_head row: the A/B of the draft vocabulary
    "early-exit": lambda r: load("early-exit", r.target),
    "early-exit-untrained": lambda r: EarlyExit(r.target),
    "draft-model": lambda r: DraftModel(_draft(r)),
    "draft-model-tree": lambda r: DraftModel(_draft(r), topk=2, width=2, budget=8),
}


# Trained drafters shipped inside the package (specdec/drafters/shipped/<base model>/<kind>/).
TRAINED = {"medusa": Medusa, "eagle": Eagle, "early-exit": EarlyExit}


def load(kind: str, model, **kwargs):
    """The trained `kind` drafter shipped for `model` (matched by its base model name), e.g.
    ``load("medusa", model)``; a clear error lists what is shipped when nothing matches. Any
    checkpoint directory loads with ``Medusa.from_pretrained(dir, model)`` (likewise the others)."""
    if kind not in TRAINED:
        raise ValueError(f"load: unknown trained drafter kind {kind!r}; choose from {', '.join(TRAINED)}")
    return TRAINED[kind].shipped(model, **kwargs)


def check_name(name: str) -> None:
    """Refuse unknown drafter names, composed ones included (see `make_drafter`)."""
    for part in name.replace("|", "+").split("+"):
        if part not in DRAFTERS:
            raise ValueError(
                f"unknown drafter {part!r}" + (f" in {name!r}" if part != name else "")
                + f"; choose from {', '.join(DRAFTERS)}, or compose them with + (merge) and | (fallback)"
            )


def make_drafter(name: str, resources: Resources):
    """The drafter registered as `name`, built from `resources`. Names compose: ``a+b`` merges
    the trees of a and b into one (`Merge`), ``a|b`` drafts with a and falls back to b when a
    has nothing (`Fallback`); ``|`` binds looser than ``+``, so ``a+b|c`` is
    ``Fallback(Merge([a, b]), c)``."""
    check_name(name)
    if "|" in name:
        primary, _, rest = name.partition("|")
        return Fallback(make_drafter(primary, resources), make_drafter(rest, resources))
    if "+" in name:
        return Merge([make_drafter(part, resources) for part in name.split("+")])
    return DRAFTERS[name](resources)
