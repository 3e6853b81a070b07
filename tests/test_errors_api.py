"""Hard edges of the API (issue 20): a drafter that misbehaves or is misused gets a clear error or
cannot change the output, and nothing a caller passes in is written to."""

import pytest
import torch
from conftest import VOCAB, random_prompt, reference, tiny_model

import specdec
from specdec.drafters import PromptLookup


class Scribbler(PromptLookup):
    """A buggy drafter: it writes into ``ctx.input_ids`` before proposing."""

    def propose(self, ctx):
        ctx.input_ids.add_(1).remainder_(VOCAB - 1)
        return super().propose(ctx)


def test_a_drafter_writing_into_its_context_changes_neither_output_nor_prompt():
    model = tiny_model()
    prompt = random_prompt(0, 16)
    before = prompt.clone()
    out = specdec.generate(model, prompt, Scribbler(min_ngram=1), max_new_tokens=12, eos_token_id=[], guard=None)
    assert torch.equal(prompt, before)
    assert torch.equal(out, reference(model, before, 12))
