"""Drafter names -> drafter objects, for the CLI, bench and demo.

A name is an entry of `DRAFTERS` with optional options, ``name[opt,key=value]`` (e.g.
``eagle[full-vocab]``, ``prompt-lookup-tree[budget=32]``); a trained drafter takes ``dir=PATH``, a
checkpoint directory (a path free of ``+ | , [ ]``), instead of the shipped one. Names compose with
``+`` (`Merge`) and ``|`` (`Fallback`). Boundary: the edge; the API takes drafter objects, never names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from specdec.drafters import (
    Datastore,
    DraftModel,
    EarlyExit,
    Fallback,
    Jacobi,
    LayerSkip,
    Lookahead,
    Merge,
    PromptLookup,
    QuantizedDraft,
    Retrieval,
    TokenRecycling,
    load,
)
from specdec.drafters.quantized import check_scheme

__all__ = ["DRAFTERS", "Entry", "Resources", "check_name", "datastore_dir", "make_drafter", "parse_name"]


@dataclass(frozen=True)
class Resources:
    """What a named drafter may be built from: the loaded target, an optional draft model, and
    an optional datastore directory (None: the target's default one, see `datastore_dir`)."""

    target: Any
    target_name: str | None = None  # the name the target was loaded by (for default datastores)
    draft: Any = None
    datastore: str | None = None
    quantized_draft: Any = None  # the draft model's int8 copy (`specdec bench --quantize-draft`)


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


def _budget(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"budget takes an int >= 1 (the most tree nodes), got {value!r}")
    return int(value)


FLAG = None  # an option without a value
BUDGET = {"budget": _budget}  # the most tree nodes, for the drafters that take a budget


@dataclass(frozen=True)
class Entry:
    """`build(resources, **options)` -> a drafter; `options`: each option's name -> FLAG or the
    function turning its value into the keyword `build` gets (dashes become underscores)."""

    build: Callable[..., Any]
    options: dict[str, Callable[[str], Any] | None] = field(default_factory=dict)


def _directory(value: str) -> str:
    if not value.strip():
        raise ValueError("dir takes a checkpoint directory (dir=PATH, e.g. the drafter/ that `specdec train` wrote)")
    return value.strip()


def _load(kind: str, r: Resources, **kwargs):
    """A trained drafter of `kind`: from option ``dir=PATH`` if given, else the shipped one."""
    if "dir" in kwargs:
        kwargs["directory"] = kwargs.pop("dir")
    return load(kind, r.target, **kwargs)


def _trained(kind: str, full_vocab: bool = True) -> Entry:
    """A trained drafter: the one shipped for the target, or ``[dir=PATH]`` a checkpoint directory
    (specdec's, or for Eagle and Medusa the engine layouts they import)."""

    def build(r: Resources, full_vocab: bool = False, **kwargs):
        # full-vocab: every lm_head row, the A/B of the draft vocabulary
        return _load(kind, r, **({"draft_vocab": None} if full_vocab else {}), **kwargs)

    return Entry(build, {"dir": _directory, **({"full-vocab": FLAG} if full_vocab else {}), **BUDGET})


def _early_exit(r: Resources, untrained: bool = False, **kwargs):
    return EarlyExit(r.target, **kwargs) if untrained else _load("early-exit", r, **kwargs)


def _count(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"takes an int >= 1, got {value!r}")
    return int(value)


def _prompt_lookup(r: Resources, fixed: bool = False, **kwargs):
    # fixed: always copy num_tokens (HF's prompt_lookup_num_tokens), not sized by the verify cost
    return PromptLookup(**({"token_cost": 0.0} if fixed else {}), **kwargs)


LOOKUP = {"fixed": FLAG, "max-ngram": _count, **BUDGET}  # bench sets num_tokens (--num-tokens)


def _quantized_self(r: Resources, fp32_head: bool = False, fixed: bool = False, **kwargs):
    # fp32-head: the lm_head stays fp32 (shared with the target), the decoder linears int8
    return QuantizedDraft(lm_head=not fp32_head, sized=not fixed, **kwargs)


def _draft_model(r: Resources, quantized: bool = False, fixed: bool = False, **kwargs):
    # quantized: the draft model's int8 copy that the bench built once (hf-assisted drafts with it too)
    if quantized and r.quantized_draft is None:
        raise ValueError("draft-model[quantized] needs the draft model's int8 copy: add --quantize-draft SCHEME")
    return DraftModel(r.quantized_draft if quantized else _draft(r), sized=not fixed, **kwargs)


def _scheme(value: str) -> str:
    check_scheme(value, "quantized-self[scheme=...]")
    return value


SIZING = {"fixed": FLAG, **BUDGET}  # fixed: always draft num_tokens deep, not sized by the measured cost
CHAIN = {**SIZING, "lookup": _count}  # lookup=N: multi-level drafting, N n-gram guesses per draft forward


DRAFTERS = {
    "prompt-lookup": Entry(_prompt_lookup, LOOKUP),
    "prompt-lookup-tree": Entry(lambda r, **o: PromptLookup(**{"num_matches": 3, "budget": 16, **o}), BUDGET),
    "token-recycling": Entry(lambda r: TokenRecycling()),
    "lookahead-pia": Entry(lambda r, **o: Lookahead(**o), BUDGET),
    "jacobi": Entry(lambda r: Jacobi()),
    "retrieval": Entry(lambda r, **o: Retrieval(_datastore(r), **o), BUDGET),
    "layer-skip": Entry(lambda r, **o: LayerSkip(r.target, **o), BUDGET),
    "medusa": _trained("medusa"),
    "eagle": _trained("eagle"),
    "eagle3": _trained("eagle3", full_vocab=False),
    "early-exit": Entry(_early_exit, {"untrained": FLAG, "dir": _directory, **BUDGET}),
    "draft-model": Entry(_draft_model, {"quantized": FLAG, **CHAIN}),
    "draft-model-tree": Entry(
        lambda r, **o: _draft_model(r, **{"topk": 2, "width": 2, "budget": 8, **o}), {"quantized": FLAG, **SIZING}
    ),
    "quantized-self": Entry(_quantized_self, {"fp32-head": FLAG, "scheme": _scheme, **CHAIN}),
}

_PART = re.compile(r"([a-z0-9-]+)(?:\[([^\[\]]*)\])?")


def parse_name(part: str) -> tuple[str, dict[str, Any]]:
    """One drafter of a name, ``name[opt,key=value]`` -> (name, {keyword: value}), checked
    against its entry: unknown names and options are refused, naming the valid ones."""
    m = _PART.fullmatch(part)
    if m is None:
        raise ValueError(f"drafter {part!r} is not NAME or NAME[option,key=value] (e.g. eagle[full-vocab])")
    name, given = m.group(1), m.group(2)
    if name not in DRAFTERS:
        raise ValueError(f"unknown drafter {name!r}; choose from {', '.join(DRAFTERS)}, or compose them with "
                         "+ (merge) and | (fallback)")
    valid, kwargs = DRAFTERS[name].options, {}
    for item in [] if given is None else given.split(","):
        key, eq, value = (s.strip() for s in item.partition("="))
        if key not in valid:
            choices = f"the options are {', '.join(valid)}" if valid else "it takes no options"
            raise ValueError(f"drafter {part!r}: unknown option {key!r}; {choices}")
        if key.replace("-", "_") in kwargs:
            raise ValueError(f"drafter {part!r}: option {key!r} is given twice")
        convert = valid[key]
        if (convert is FLAG) == bool(eq):
            raise ValueError(f"drafter {part!r}: option {key!r} "
                             + ("is a flag and takes no value" if eq else f"needs a value ({key}=...)"))
        try:
            kwargs[key.replace("-", "_")] = True if convert is FLAG else convert(value)
        except ValueError as err:
            raise ValueError(f"drafter {part!r}: {err}") from None
    return name, kwargs


def _parts(name: str) -> list[str]:
    return name.replace("|", "+").split("+")


def check_name(name: str) -> None:
    """Refuse unknown drafter names and options, composed ones included (see `make_drafter`)."""
    for part in _parts(name):
        try:
            parse_name(part)
        except ValueError as err:
            raise ValueError(f"{err}" + (f" (in {name!r})" if part != name else "")) from None


def make_drafter(name: str, resources: Resources):
    """The drafter `name` (see the module docstring), built from `resources`. ``a+b`` merges the
    trees of a and b into one (`Merge`), ``a|b`` drafts with a and falls back to b when a has
    nothing (`Fallback`); ``|`` binds looser than ``+``, so ``a+b|c`` is ``Fallback(Merge([a, b]), c)``."""
    check_name(name)
    return _build(name, resources)


def _build(name: str, resources: Resources):
    """`make_drafter` on a name `check_name` accepted (each part parsed once, here)."""
    if "|" in name:
        primary, _, rest = name.partition("|")
        return Fallback(_build(primary, resources), _build(rest, resources))
    if "+" in name:
        return Merge([_build(part, resources) for part in name.split("+")])
    base, kwargs = parse_name(name)
    return DRAFTERS[base].build(resources, **kwargs)
