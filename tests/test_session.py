"""`Session`: a conversation reuses the target's cache and keeps the drafter, with exact outputs."""

import copy

import pytest
import torch

import specdec
from conftest import random_prompt, reference, tiny_model
from specdec.drafters import DraftModel, Eagle, PromptLookup
from specdec.drafters.eagle import EagleHead


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


class FailsOnce:
    """Raises on its `at`-th call, once: a streamer's put, a drafter's propose, or a forward pre-hook on a
    decoder layer (a forward interrupted part-way, e.g. by Ctrl-C: earlier layers have cached the new tokens)."""

    def __init__(self, at: int):
        self.at, self.calls = at, 0

    def __call__(self, *args):
        self.calls += 1
        if self.calls == self.at:
            raise RuntimeError("failed on purpose")


class FailingStreamer:
    def __init__(self, at):
        self.put = FailsOnce(at)

    def end(self):
        pass


class FailingDraftModel(DraftModel):
    def __init__(self, model, at, **kwargs):
        super().__init__(model, **kwargs)
        self.fail = FailsOnce(at)

    def propose(self, ctx):
        self.fail()
        return super().propose(ctx)


def random_eagle(model) -> Eagle:
    torch.manual_seed(0)
    head = EagleHead.for_target(model)
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return Eagle(model, head, min_gain=0)


@pytest.mark.parametrize("where, at", [
    ("streamer", 3), ("propose", 2),
    ("draft forward", 1), ("draft forward", 4),
    ("target forward", 1), ("target forward", 3),
    ("eagle head forward", 3),
])
def test_a_session_works_after_a_turn_that_raised(where, at):
    """A turn that raised (a streamer, the drafter, or a forward cut off part-way) leaves the session
    usable: the next turns are exact, and the drafter is not left marked in use."""
    model, draft = copy.deepcopy(tiny_model(layers=3)), copy.deepcopy(tiny_model(seed=3, layers=3))
    if where == "eagle head forward":
        drafter = random_eagle(model)
        hook = drafter.head.register_forward_hook(FailsOnce(at))  # after the head cached the new pairs
    else:
        drafter = FailingDraftModel(draft, at if where == "propose" else 0, num_tokens=4)
        layer = {"draft forward": draft, "target forward": model}.get(where)
        hook = layer.model.layers[1].register_forward_pre_hook(FailsOnce(at)) if layer is not None else None
    session = specdec.Session(model, drafter, max_new_tokens=12, eos_token_id=[], guard=None)
    prompt = random_prompt(0, 16)
    with pytest.raises(RuntimeError, match="on purpose"):
        session.generate(prompt, streamer=FailingStreamer(at) if where == "streamer" else None)
    if hook is not None:
        hook.remove()
    out = session.generate(prompt)
    assert torch.equal(out, reference(model, prompt, 12))
    follow_up = torch.cat([out, random_prompt(1, 4)], dim=1)
    assert torch.equal(session.generate(follow_up), reference(model, follow_up, 12))
