"""Drafter behaviour beyond exactness: verification hides a poor drafter, so check drafts directly."""

import copy

import numpy as np
import pytest
import torch
from transformers import DynamicCache

import specdec
from conftest import random_prompt, reference, tiny_model
from specdec import kv
from specdec.drafter import Context, Feedback
from specdec.drafters import DraftModel, PromptLookup
from specdec.trees import TokenTree


def test_continuations_most_recent_and_longest_first():
    ids = np.array([1, 2, 3, 9, 1, 2, 4, 7, 2, 5, 1, 2])
    found = PromptLookup(max_ngram=2, num_matches=5).continuations(ids, 3)
    assert [(n, c.tolist()) for n, c in found] == [(2, [4, 7, 2]), (2, [3, 9, 1]), (1, [5, 1, 2])]
    # the suffix itself is never a match, and duplicates appear once
    assert PromptLookup(max_ngram=1, num_matches=9).continuations(np.array([4, 4, 4]), 2)[0][1].tolist() == [4]


def test_prompt_lookup_tree_is_a_trie_of_matches():
    drafter = PromptLookup(max_ngram=2, num_matches=3, num_tokens=3, token_cost=0)
    tree = drafter.propose(Context(torch.tensor([1, 2, 3, 9, 1, 2, 3, 8, 2, 5, 1, 2])))
    paths = {tuple(tree.tokens[tree.path_to(i)].tolist()) for i in range(len(tree)) if not tree.children(i)}
    assert paths == {(3, 8, 2), (3, 9, 1), (5, 1, 2)}  # the two "3 ..." matches share their first node
    assert len(tree) == 8


def test_prompt_lookup_drafts_by_the_measured_curve():
    ctx = dict(input_ids=torch.tensor([5, 6, 7, 8, 9, 10, 11, 12, 13, 5]))
    flat = Context(**ctx, verify_cost=lambda n: 1.0)  # verifying is free: copy all 8
    steep = Context(**ctx, verify_cost=lambda n: 1.0 + 2.0 * n)  # each draft token triples the cost
    assert len(PromptLookup(max_ngram=1, num_tokens=8).propose(flat)) == 8
    assert len(PromptLookup(max_ngram=1, num_tokens=8).propose(steep)) == 0
    assert len(PromptLookup(max_ngram=1, num_tokens=8, token_cost=0).propose(steep)) == 8  # a number overrides


def test_prompt_lookup_adapts_length_to_acceptance():
    drafter = PromptLookup(max_ngram=1, num_tokens=8, token_cost=0.2)
    ctx = Context(torch.tensor([5, 6, 7, 8, 9, 10, 11, 12, 13, 5]))
    first = len(drafter.propose(ctx))
    for _ in range(20):  # the target never agrees
        tree = drafter.propose(ctx)
        drafter.update(Feedback(tree, [], torch.tensor([0])))
    assert first > 0 and len(drafter.propose(ctx)) < first
    assert any(len(drafter.propose(ctx)) for _ in range(100))  # skipped n-grams are re-probed later
    for _ in range(40):  # the target agrees with everything
        tree = drafter.propose(ctx)
        drafter.update(Feedback(tree, list(range(len(tree))), torch.zeros(len(tree) + 1)))
    assert len(drafter.propose(ctx)) == 8


def assert_cache_holds(drafter, model):
    """The draft model's private cache equals a fresh one over the tokens it claims to hold."""
    fresh = DynamicCache(config=model.config)
    model(input_ids=drafter.cached[None], **kv.cache_kwargs(model, fresh), use_cache=True)
    for mine, ref in zip(drafter.cache.layers, fresh.layers):
        torch.testing.assert_close(mine.keys, ref.keys, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kwargs", [dict(), dict(num_tokens=5, budget=3), dict(topk=3, num_tokens=3, budget=6)])
def test_draft_cache_stays_reconciled_after_rejections(kwargs):
    target, small = tiny_model(), tiny_model(seed=2, layers=1)
    drafter = DraftModel(small, **kwargs)
    steps = []
    specdec.generate(target, random_prompt(4, 9), drafter, max_new_tokens=30, eos_token_id=[], on_step=steps.append)
    assert any(len(s.accepted_nodes) < len(s.tree) for s in steps)  # there were rejections
    assert all(len(s.tree) <= kwargs.get("budget", 99) for s in steps)
    assert_cache_holds(drafter, small)


def test_self_drafted_tree_contains_the_greedy_path():
    model = tiny_model()
    stats = specdec.GenerationStats()
    drafter = DraftModel(model, topk=2, width=8, num_tokens=3, sized=False)  # every top-2 branch to depth 3
    specdec.generate(model, random_prompt(8, 6), drafter, max_new_tokens=24, eos_token_id=[], stats=stats, guard=None)
    assert stats.mean_accepted == 4.0


def test_draft_model_respects_max_depth():
    model = tiny_model()
    drafter = DraftModel(model, num_tokens=5, sized=False)
    drafter.begin(model)
    assert len(drafter.propose(Context(random_prompt(0, 5)[0], max_depth=0))) == 0
    tree = drafter.propose(Context(random_prompt(0, 5)[0], max_depth=2))
    assert isinstance(tree, TokenTree) and len(tree) == 2
    assert_cache_holds(drafter, model)


def test_draft_model_takes_a_quantized_model():
    """A dynamically quantized lm_head has `weight()` as a method: drafters read `out_features`."""
    target = copy.deepcopy(tiny_model()).float()  # dynamic int8 linears take float32
    small = torch.ao.quantization.quantize_dynamic(copy.deepcopy(tiny_model(seed=2, layers=1)).float())
    assert callable(small.get_output_embeddings().weight)
    prompt = random_prompt(3, 7)
    out = specdec.generate(target, prompt, DraftModel(small, num_tokens=3), max_new_tokens=20, eos_token_id=[])
    assert torch.equal(out, reference(target, prompt, 20))
