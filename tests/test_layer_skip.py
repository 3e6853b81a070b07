"""`LayerSubset` (the target run through some of its own layers) and the `LayerSkip` drafter."""


import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import leaves_untouched, random_prompt, reference, run, tiny_model
from helpers import assert_cache_stays_reconciled, assert_drafts_what_the_target_says, identity_layers
from specdec import kv
from specdec.drafter import Context
from specdec.drafters.draft_model import DraftModel
from specdec.drafters.early_exit import EarlyExit
from specdec.drafters.layer_skip import LayerSkip
from specdec.drafters.layer_view import LayerSubset, causal_mask, check_faithful
from specdec.trees import TokenTree, tree_mask

MAX_NEW = 24


def target_logits(model, ids, positions, cache, mask=None):
    out = model(
        input_ids=ids[None], position_ids=positions[None], attention_mask=mask,
        **kv.cache_kwargs(model, cache), use_cache=True,
    )
    return out.logits[0]


@pytest.mark.parametrize("arch", ["llama", "qwen"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_all_layers_reproduce_the_target(arch, attn):
    model = tiny_model(arch, attn=attn, layers=3)
    view = LayerSubset(model, [0, 1, 2])
    ids = random_prompt(1, 10)[0]
    # prefill over 7 tokens, then 3 more incrementally, each side with its own cache
    mine, theirs = view.new_cache(), kv.new_cache(model)
    a = view(ids[:7], torch.arange(7), cache=mine).logits
    b = target_logits(model, ids[:7], torch.arange(7), theirs)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-9)
    for i in range(7, 10):
        a = view(ids[i : i + 1], torch.tensor([i]), cache=mine).logits
        b = target_logits(model, ids[i : i + 1], torch.tensor([i]), theirs)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9)
    assert view.cached(mine) == kv.length(theirs) == 10
    # a tree-masked forward over siblings and a grandchild after the cached prefix
    tree = TokenTree(torch.tensor([5, 9, 6, 7]), torch.tensor([-1, -1, 0, 2]))
    rows = torch.arange(len(tree))
    mask = tree_mask(tree, rows, 0, 10, model.dtype)  # [1, 1, 4, 14]
    positions = 9 + tree.depths()
    a = view(tree.tokens, positions, cache=mine, mask=mask).logits
    b = target_logits(model, tree.tokens, positions, theirs, mask)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-9)


@pytest.mark.parametrize("arch", ["llama", "qwen"])
def test_a_subset_with_cache_matches_itself_without(arch):
    """Skipping layer 0 too: the view's cache holds only layers 1 and 3, at their own indices."""
    model = tiny_model(arch, layers=4)
    view = LayerSubset(model, [1, 3])
    ids = random_prompt(2, 9)[0]
    whole = view(ids, torch.arange(9)).logits  # [9, vocab], no cache, explicit causal mask
    cache = view.new_cache()
    parts = [view(ids[:5], torch.arange(5), cache=cache).logits]
    parts += [view(ids[i : i + 1], torch.tensor([i]), cache=cache).logits for i in range(5, 9)]
    torch.testing.assert_close(torch.cat(parts), whole, rtol=0, atol=1e-9)
    assert view.cached(cache) == 9 and kv.length(cache, 0) == 0  # layer 0 never ran
    full = LayerSubset(model, range(4))(ids, torch.arange(9)).logits
    assert (full - whole).abs().max() > 1e-3  # a real subset is another model


def test_states_and_hidden_input_resume_the_forward():
    model = tiny_model(layers=4)
    ids = random_prompt(3, 8)[0]
    full = LayerSubset(model, range(4))(ids, torch.arange(8), return_states=True)
    assert full.states.shape == (5, 8, model.config.hidden_size)
    resumed = LayerSubset(model, [2, 3])(None, torch.arange(8), hidden=full.states[2]).logits
    torch.testing.assert_close(resumed, full.logits, rtol=0, atol=1e-9)


def test_causal_mask():
    mask = causal_mask(2, 3, torch.float64)
    assert mask.shape == (1, 1, 3, 5)
    allowed = (mask[0, 0] == 0).int().tolist()
    assert allowed == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]


class DoubledLogits(LlamaForCausalLM):
    """A model whose forward does more than embed -> layers -> norm -> lm_head."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 2
        return out


def test_unsupported_models_are_refused():
    with pytest.raises(ValueError, match="not a transformers causal LM"):
        LayerSubset(torch.nn.Linear(4, 4), [0])
    model = tiny_model(layers=3)
    for bad in ([3], [1, 0], [1, 1], [-1]):
        with pytest.raises(ValueError, match="ascending indices"):
            LayerSubset(model, bad)
    torch.manual_seed(0)
    odd = DoubledLogits(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=1)).double().eval()
    with pytest.raises(ValueError, match="does more than"):
        check_faithful(odd)
    with pytest.raises(ValueError, match="does more than"):
        LayerSkip(odd)


def test_arguments_are_validated():
    model = tiny_model(layers=3)
    for kwargs, word in [
        (dict(skip=[0, 1, 2]), "skip"), (dict(skip=[5]), "skip"), (dict(draft_tokens=0), "draft_tokens"),
        (dict(min_confidence=1.0), "min_confidence"), (dict(calibrate_tokens=2), "calibrate_tokens"),
        (dict(calibrate_trials=0), "calibrate_trials"), (dict(max_skip_ratio=1.0), "max_skip_ratio"),
    ]:
        with pytest.raises(ValueError, match=word):
            LayerSkip(model, **kwargs)
    with pytest.raises(ValueError, match="build LayerSkip\\(target\\)"):
        LayerSkip(model, skip=[1]).begin(tiny_model(layers=3, seed=1))


@pytest.mark.parametrize("arch", ["llama", "qwen"])
@pytest.mark.parametrize(
    "kwargs",
    [dict(skip=[2]), dict(skip=[1, 2], min_confidence=0.0), dict(), dict(topk=2, width=3, budget=6, draft_tokens=3)],
    ids=["skip", "skip-2-no-confidence", "calibrated", "tree"],
)
def test_exact(arch, kwargs):
    model = tiny_model(arch, layers=4)
    prompt = random_prompt(5, 12)
    drafter = LayerSkip(model, **kwargs)
    out, stats = run(model, prompt, drafter, MAX_NEW)
    assert torch.equal(out, reference(model, prompt, MAX_NEW))
    assert drafter.skip is not None and 0 not in drafter.skip and 3 not in drafter.skip
    if "skip" not in kwargs:
        assert drafter.calibration is not None and drafter.calibration.skip == drafter.skip


@pytest.mark.parametrize("arch", ["llama", "qwen"])
def test_no_skipped_layer_drafts_what_the_target_says(arch):
    """skip=[] drafts with the whole target: every drafted token must be accepted, every step."""
    model = tiny_model(arch, layers=3)
    assert_drafts_what_the_target_says(model, LayerSkip(model, skip=[], draft_tokens=4, min_confidence=0.0))


def test_calibration_finds_layers_that_do_nothing():
    model = identity_layers(tiny_model(layers=6, seed=3), [2, 3])
    drafter = LayerSkip(model, min_confidence=0.0)  # a random model is never confident
    drafter.begin(model)
    assert len(drafter.propose(Context(random_prompt(7, 30)[0]))) > 0
    cal = drafter.calibration
    assert {2, 3} <= set(cal.skip) and not {0, 5} & set(cal.skip)
    assert cal.window == 30 and len(cal.tried) <= drafter.calibrate_trials
    assert cal.agreement == max(a for s, a, _ in cal.tried if len(s) == len(cal.skip))


def test_calibration_waits_for_context_and_recalibrates():
    model = tiny_model(layers=5)
    drafter = LayerSkip(model, calibrate_tokens=16, min_confidence=0.0)
    drafter.begin(model)
    assert len(drafter.propose(Context(random_prompt(1, 4)[0]))) == 0 and drafter.skip is None
    drafter.propose(Context(random_prompt(1, 40)[0]))
    first = drafter.calibration
    assert first.window == 16 and drafter.skip == first.skip
    drafter.recalibrate()
    assert drafter.skip is None
    drafter.propose(Context(random_prompt(2, 40)[0]))
    assert drafter.calibration is not first


@pytest.mark.parametrize("kwargs", [dict(skip=[1]), dict(skip=[2], topk=2, draft_tokens=3)])
def test_draft_cache_stays_reconciled(kwargs):
    model = tiny_model(layers=4)
    assert_cache_stays_reconciled(model, LayerSkip(model, min_confidence=0.0, **kwargs))


@pytest.mark.parametrize("kwargs", [dict(skip=[1]), dict(skip=[2], topk=2, draft_tokens=3)])
def test_a_window_keeps_the_prompt_head_out_of_the_draft_cache(kwargs):
    model = tiny_model(layers=4)
    drafter = LayerSkip(model, min_confidence=0.0, window=8, **kwargs)
    assert_cache_stays_reconciled(model, drafter, prompt_length=40)
    assert drafter.start == 40 - 8  # fed the prompt's last 8 tokens, then grew with the sequence
    with pytest.raises(ValueError, match="window must be >= 1"):
        LayerSkip(model, window=0)


@pytest.mark.parametrize("make", [
    lambda m: LayerSkip(m, skip=[1], window=5, min_confidence=0.0),
    lambda m: EarlyExit(m, exit_layer=2, window=5, min_confidence=0.0),
    lambda m: DraftModel(tiny_model(seed=3, layers=4), num_tokens=3, topk=2, window=5),
], ids=["layer-skip", "early-exit", "draft-model"])
def test_windowed_drafters_are_exact_across_turns(make):
    model = tiny_model(layers=4)
    drafter = make(model)
    first = random_prompt(7, 30)
    out = run(model, first, drafter, MAX_NEW)[0]
    assert torch.equal(out, reference(model, first, MAX_NEW))
    for follow_up in (torch.cat([out, random_prompt(8, 12)], dim=1), random_prompt(9, 4)):  # a new turn, a new chat
        assert torch.equal(run(model, follow_up, drafter, MAX_NEW)[0], reference(model, follow_up, MAX_NEW))


def test_the_target_is_left_untouched():
    model = tiny_model("qwen", layers=4)
    with leaves_untouched(model):
        for drafter in (LayerSkip(model), LayerSkip(model, skip=[1, 2], topk=2)):
            run(model, random_prompt(9, 12), drafter, MAX_NEW)
