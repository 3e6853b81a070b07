"""Concrete drafters. Each is a plain object implementing `specdec.Drafter`.

Boundary: drafters import the core interfaces and `specdec.trees`; the core never imports them.
"""

from specdec.drafters.draft_model import DraftModel
from specdec.drafters.prompt_lookup import PromptLookup

__all__ = ["DRAFTERS", "DraftModel", "PromptLookup"]


def _needs_draft(draft):
    if draft is None:
        raise ValueError("this drafter needs a draft model: pass --draft-model NAME (e.g. qwen2.5-coder-0.5b)")
    return draft


# The one place where drafter names become objects; used only at the CLI/demo edge.
# Each entry builds a fresh drafter from the (optional) loaded draft model.
DRAFTERS = {
    "prompt-lookup": lambda draft=None: PromptLookup(),
    "prompt-lookup-tree": lambda draft=None: PromptLookup(num_matches=3, budget=16),
    "draft-model": lambda draft=None: DraftModel(_needs_draft(draft)),
    "draft-model-tree": lambda draft=None: DraftModel(_needs_draft(draft), topk=2, width=2, budget=8),
}
