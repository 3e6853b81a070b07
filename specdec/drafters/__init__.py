"""Concrete drafters. Each is a plain object implementing `specdec.Drafter`.

Boundary: drafters import the core interfaces and `specdec.trees`; the core never imports them.
"""

from specdec.drafters.draft_model import DraftModel
from specdec.drafters.prompt_lookup import PromptLookup

__all__ = ["DraftModel", "PromptLookup"]
