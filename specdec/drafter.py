"""The drafter interface: what the core needs from anything that proposes tokens.

Boundary: interface only, no behaviour. The core sees drafters only through this module and
never asks which kind of drafter it holds.

Contract: `propose` must be correct from `ctx` alone. Any private state (a draft model's KV
cache, an n-gram index) is an optimisation the drafter reconciles itself against
``ctx.input_ids``, so new prompts, rejections and restarts need no special protocol.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from torch import Tensor

from specdec.packing import Packing
from specdec.trees import DEFAULT_VERIFY_COST, TokenTree

_DEFAULT_PACKING = Packing()  # a Context built outside generate: each model's default crossover


@dataclass(frozen=True)
class Context:
    input_ids: Tensor  # [t] every committed token (prompt + generated); batch size 1; a copy per step
    # Target last-layer states for the tokens committed by the previous step (the root and the
    # accepted path), only for drafters with needs_hidden_states.
    hidden_states: Tensor | None = None  # [m, F]: F = hidden, or more for `hidden_layers`
    max_depth: int | None = None  # deeper nodes cannot be used (remaining token budget)
    # Time of the target forward that verifies n draft nodes (n + 1 tokens with the root),
    # relative to a forward over the root alone (so verify_cost(0) = 1), non-decreasing in n: the
    # stored `specdec profile` curve on this machine, else the default linear curve. Drafters size
    # trees with it (`specdec.trees.sizing`).
    verify_cost: Callable[[int], float] = DEFAULT_VERIFY_COST
    # The runtime's packing decision for this call: a drafter runs its own forwards inside
    # ``packing.route(model)(k)`` (or asks ``packing.packed_from(model)``) and never decides itself.
    packing: Packing = _DEFAULT_PACKING
    # Seconds of one root-only target forward on this call, a running mean over the verify forwards
    # so far (each divided by its verify_cost); None before the first. Drafters that run a model of
    # their own size their drafts by their forward's cost relative to this (`best_size(draft_cost=)`).
    forward_s: float | None = None


@dataclass(frozen=True)
class Feedback:
    tree: TokenTree  # what was proposed
    accepted_nodes: list[int]  # root-to-node path through the tree (may be empty)
    new_tokens: Tensor  # [len(accepted_nodes) + 1] accepted drafts + the target's own token
    # The target's `feedback_topk` most likely next tokens after the root (row 0) and after each
    # node (row i + 1), from the processed logits; only for drafters that set feedback_topk > 0
    # (token recycling's successor table, Jacobi iterations). Free: the verifier computed them.
    target_topk: Tensor | None = None  # [len(tree) + 1, feedback_topk]


@runtime_checkable
class Drafter(Protocol):
    """Optional attributes: ``feedback_topk: int`` (default 0) asks for `Feedback.target_topk`;
    ``memory_bytes: int`` (default 0) is what the drafter holds beyond the target (weights it
    built or loaded), reported in `GenerationStats.draft_bytes`."""

    needs_hidden_states: bool  # ask the verifier for target hidden states (like HF's requires_model_outputs)
    # Optional ``hidden_layers: tuple[int, ...]``: which of HF's output_hidden_states the states
    # concatenate (default ``(-1,)``, the last post-norm layer; an EAGLE-3 head reads three).

    def begin(self, target) -> None:
        """Called once per generation before the first propose: validate against the target
        (vocabulary, hidden size) with a clear error, and reset per-sequence state."""

    def propose(self, ctx: Context) -> TokenTree: ...

    def update(self, feedback: Feedback) -> None:
        """Learn from the verifier's decision (adapt lengths, fill tables); may do nothing."""


def hidden_layers(drafter) -> tuple[int, ...]:
    """The target states `drafter` reads: its optional ``hidden_layers``, else the last layer's."""
    return tuple(getattr(drafter, "hidden_layers", (-1,)))


def check_drafter(given, who: str = "drafter") -> None:
    """Refuse what is not a drafter object (a CLI name, a drafter class, anything lacking the
    protocol), naming `who` and the fix; the one check `generate`, `Merge` and `Fallback` make."""
    if isinstance(given, str):
        raise TypeError(
            f"{who}: got the name {given!r}; pass a drafter object: specdec.registry.make_drafter({given!r}, "
            "specdec.registry.Resources(model)) builds one from a CLI name"
        )
    if isinstance(given, type):
        raise TypeError(f"{who}: got the class {given.__name__}; pass an instance, e.g. {given.__name__}()")
    missing = [name for name in ("needs_hidden_states", "begin", "propose", "update") if not hasattr(given, name)]
    if missing:
        raise TypeError(
            f"{who}: {type(given).__name__} has no {', '.join(missing)}, so it is not a drafter; pass an object "
            "that implements specdec.Drafter (needs_hidden_states, begin, propose, update)"
        )
