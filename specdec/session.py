"""`Session`: one conversation with a target, kept across turns.

A chat sends the whole conversation again every turn. A session keeps what the earlier turns
built: the target's KV cache (the common prefix with the new prompt is not prefilled again),
the drafter with its tables and statistics (n-gram and retrieval drafters copy from earlier
turns, as CopySpec does, because the prompt holds them), and the no-slowdown guard's
measurements. Outputs are those of `specdec.generate`, turn by turn.

Boundary: core level; it composes `generate`, `Verifier` and `Guard` and knows no drafter.
"""

from __future__ import annotations

from torch import Tensor

from specdec.decode import generate
from specdec.drafter import Drafter
from specdec.guard import Guard
from specdec.verifier import Verifier


class Session:
    def __init__(self, model, drafter: Drafter | None = None, *, guard: Guard | bool | None = True, **generate_kwargs):
        """`generate_kwargs` (max_new_tokens, do_sample, temperature, ...) apply to every turn;
        a turn's own keyword arguments override them."""
        if "verifier" in generate_kwargs:
            raise ValueError("Session: the session owns the verifier; do not pass verifier=")
        self.model, self.drafter = model, drafter
        self.guard = Guard() if guard is True else (guard or None)
        self.generate_kwargs = generate_kwargs
        self.verifier = Verifier(model)

    def generate(self, input_ids: Tensor, **kwargs) -> Tensor:
        """The next turn: `input_ids` is the whole conversation so far ([1, t], e.g. the chat
        template over every message). Returns ``[1, t + new]`` as `specdec.generate` does."""
        return generate(
            self.model, input_ids, self.drafter, guard=self.guard, verifier=self.verifier,
            **{**self.generate_kwargs, **kwargs},
        )
