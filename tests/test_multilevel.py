"""Multi-level drafting (`lookup=N`): n-gram guesses fed with a draft chain's forwards give the same
chain in fewer draft forwards, and outputs stay exact."""

import copy

import pytest
import torch

from conftest import leaves_untouched, random_prompt, reference, repetitive, run, tiny_model
from specdec import kv
from specdec.drafters import DraftModel, QuantizedDraft
from specdec.registry import Resources, make_drafter
from test_quantized import fp32, perturb


def counted(drafter: DraftModel) -> list[int]:
    """Wrap `drafter`'s forward; the returned list gets each forward's token count."""
    sizes: list[int] = []
    forward = drafter._forward

    def wrapped(ids, *args):
        sizes.append(ids.numel())
        return forward(ids, *args)

    drafter._forward = wrapped
    return sizes


def chains(stats) -> list[list[int]]:
    return [step.tree.tokens.tolist() for step in stats.steps]


@pytest.mark.parametrize("seed", range(4))
def test_same_chains_in_fewer_forwards(seed):
    """float64 draft and target: the guessed chain equals the plain one exactly, step by step."""
    target, draft = tiny_model("llama"), tiny_model("llama", seed=1)
    prompt = repetitive(seed)
    plain, guessed = DraftModel(draft, num_tokens=5, sized=False), DraftModel(draft, num_tokens=5, sized=False,
                                                                              lookup=4)
    plain_sizes, guessed_sizes = counted(plain), counted(guessed)
    with leaves_untouched(draft):
        out_plain, stats_plain = run(target, prompt, plain, 40)
        out_guessed, stats_guessed = run(target, prompt, guessed, 40)
    assert torch.equal(out_guessed, reference(target, prompt, 40)) and torch.equal(out_plain, out_guessed)
    assert chains(stats_guessed) == chains(stats_plain)
    assert len(guessed_sizes) < len(plain_sizes)  # some guesses were the draft's own tokens
    assert max(guessed_sizes[1:]) > 2  # guesses were fed after the first (prefill) forward


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_exact_with_rejections_at_every_depth(arch):
    model = fp32(arch)
    drafter = QuantizedDraft("int8", num_tokens=4, sized=False, lookup=3)
    drafter.begin(model)
    perturb(drafter.copy, 0.3)
    sizes = counted(drafter._draft)
    rejected_at, levels = set(), 0
    with leaves_untouched(model):
        for seed in range(6):
            prompt = repetitive(seed)
            out, stats = run(model, prompt, drafter, 40)
            assert torch.equal(out, reference(model, prompt, 40))
            for step in stats.steps:
                depth = len(step.accepted_nodes)
                levels += len(step.tree)
                if len(step.tree) and depth < int(step.tree.depths().max()):
                    rejected_at.add(depth)
    assert rejected_at == set(range(4))
    assert len(sizes) < levels  # fewer draft forwards than drafted tokens


def test_guesses_never_overrun_the_depth_or_the_cache():
    """A guess longer than the room left is cut; the draft cache holds exactly the tokens the
    drafter says it holds after every proposal."""
    model = tiny_model("llama")
    drafter = DraftModel(tiny_model("llama", seed=1), num_tokens=3, sized=False, lookup=8)
    prompt = repetitive(2)
    out, stats = run(model, prompt, drafter, 30)
    assert torch.equal(out, reference(model, prompt, 30))
    assert all(len(step.tree) <= 3 for step in stats.steps)
    assert kv.length(drafter.cache) == drafter.cached.numel()


def test_cost_is_per_drafted_level_and_a_prefill_is_not_costed():
    drafter = DraftModel(tiny_model("llama", seed=1), num_tokens=4, sized=False, lookup=3)
    model = tiny_model("llama")
    run(model, random_prompt(0, 40), drafter, 2)  # one proposal, whose first forward is a 40-token prefill
    assert drafter._forward_s.hits == 0
    run(model, random_prompt(0, 40), drafter, 12)  # the cache is reused: small forwards only
    assert drafter._forward_s.hits > 0


def test_options_and_registry():
    model = fp32("llama")
    assert make_drafter("quantized-self[lookup=3]", Resources(model))._options["lookup"] == 3
    with pytest.raises(ValueError, match="lookup"):
        make_drafter("quantized-self[lookup=0]", Resources(model))
    with pytest.raises(ValueError, match="chain only"):
        DraftModel(copy.deepcopy(model), topk=2, lookup=2)
    with pytest.raises(ValueError, match="lookup must be >= 0"):
        QuantizedDraft("int8", lookup=-1)
    with pytest.raises(ValueError, match="unknown option 'lookup'"):  # the tree variant does not offer it
        make_drafter("draft-model-tree[lookup=2]", Resources(model, draft=model))
