"""`Session`: a conversation reuses the target's cache and keeps the drafter, with exact outputs."""

import pytest
import torch
from conftest import random_prompt, reference, tiny_model

import specdec
from specdec.drafters import PromptLookup


class CountingTarget:
    """Counts the tokens the target is fed, through a forward pre-hook (nothing is modified)."""

    def __init__(self, model):
        self.fed = 0
        self.handle = model.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        self.fed += kwargs["input_ids"].shape[1]

    def close(self):
        self.handle.remove()


@pytest.mark.parametrize("arch", ["llama", "qwen"])
def test_turns_are_exact_and_reuse_the_cache(arch):
    model = tiny_model(arch)
    session = specdec.Session(model, PromptLookup(), max_new_tokens=12, eos_token_id=[])
    conversation = random_prompt(1, 10)
    for turn in range(3):
        stats = specdec.GenerationStats()
        counter = CountingTarget(model)
        try:
            out = session.generate(conversation, stats=stats)
        finally:
            counter.close()
        assert torch.equal(out, reference(model, conversation, 12))
        prefilled = counter.fed - sum(len(s.tree) + 1 for s in stats.steps)
        # turn 0 prefills the prompt but its last token (the first root); later turns only what
        # the cache lacks: the previous turn's last token and the new message but its last token
        assert prefilled == (9 if turn == 0 else 1 + 4)
        conversation = torch.cat([out, random_prompt(10 + turn, 5)], dim=1)


def test_an_edited_history_is_prefilled_from_where_it_differs():
    model = tiny_model()
    session = specdec.Session(model, max_new_tokens=8, eos_token_id=[])
    first = session.generate(random_prompt(2, 12))
    edited = first.clone()
    edited[0, 5] = (edited[0, 5] + 1) % model.config.vocab_size  # an earlier message changed
    out = session.generate(edited)
    assert torch.equal(out, reference(model, edited, 8))
    assert torch.equal(session.verifier.prefix[:5], edited[0, :5])


def test_a_shorter_prompt_and_the_same_prompt_again():
    model = tiny_model("qwen")
    session = specdec.Session(model, PromptLookup(), max_new_tokens=6, eos_token_id=[])
    prompt = random_prompt(3, 9)
    a = session.generate(prompt)
    b = session.generate(prompt)  # everything but the root is cached: one token is fed again
    c = session.generate(prompt[:, :4])
    assert torch.equal(a, b) and torch.equal(a, reference(model, prompt, 6))
    assert torch.equal(c, reference(model, prompt[:, :4], 6))


def test_session_refuses_a_foreign_verifier_and_verifier_argument():
    model, other = tiny_model(), tiny_model(seed=1)
    with pytest.raises(ValueError, match="verifier"):
        specdec.Session(model, verifier=specdec.Verifier(model))
    with pytest.raises(ValueError, match="another model"):
        specdec.generate(model, random_prompt(0, 5), max_new_tokens=2, verifier=specdec.Verifier(other))
