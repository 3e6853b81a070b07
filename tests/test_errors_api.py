"""Hard edges of the API (issue 20): a drafter that misbehaves or is misused gets a clear error or
cannot change the output, and nothing a caller passes in is written to."""

import pytest
import torch
from conftest import VOCAB, random_prompt, reference, tiny_model
from transformers import LogitsProcessor, LogitsProcessorList

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


class BanAllAt(LogitsProcessor):
    """Bans every token for the row whose context has `length` tokens (a processor that overreaches)."""

    def __init__(self, length: int):
        self.length = length

    def __call__(self, input_ids, scores):
        return torch.full_like(scores, float("-inf")) if input_ids.shape[-1] == self.length else scores


@pytest.mark.xfail(strict=True, reason="issue 20 item 3: seeded sampling returns token 0, unseeded raises torch's multinomial error")
@pytest.mark.parametrize("seed", [None, 5])
@pytest.mark.parametrize("with_drafter", [False, True])
def test_sampling_a_row_that_bans_every_token_raises_one_clear_error(seed, with_drafter):
    model = tiny_model()
    prompt = random_prompt(0, 16)
    procs = LogitsProcessorList([BanAllAt(prompt.shape[1] + 3)])  # the 4th new token has nothing left
    drafter = PromptLookup(min_ngram=1) if with_drafter else None
    with pytest.raises(ValueError, match="logits_processor"):
        specdec.generate(model, prompt, drafter, max_new_tokens=8, eos_token_id=[], do_sample=True, seed=seed,
                         logits_processor=procs, guard=None)
