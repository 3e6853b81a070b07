"""Lookahead: exact outputs, the frequency trie (windows, incremental insertion, pruning), branch
selection under the budget and the cost curve, persistence across calls and a vocabulary change."""

import pytest
import torch

from conftest import VOCAB, random_prompt, reference, repetitive, run, tiny_model
from specdec.drafter import Context, Feedback
from specdec.drafters.lookahead import Lookahead, TokenTrie

MAX_NEW = 40


def contents(trie):
    """{path: count} of every node."""
    found, stack = {}, [((), trie.root)]
    while stack:
        path, node = stack.pop()
        for tok, child in (node.children or {}).items():
            found[path + (tok,)] = child.count
            stack.append((path + (tok,), child))
    return found


@pytest.mark.parametrize("arch", ["llama", "qwen"])
def test_exact_and_accepting(arch):
    model = tiny_model(arch)
    drafter = Lookahead()  # one drafter for every prompt: the trie carries over
    for seed in range(3):
        for prompt, is_repetitive in ((random_prompt(seed, 8), False), (repetitive(seed), True)):
            out, stats = run(model, prompt, drafter, MAX_NEW)
            assert torch.equal(out, reference(model, prompt, MAX_NEW)), (seed, is_repetitive)
            if is_repetitive:
                assert stats.mean_accepted > 1.0, seed


def test_exact_with_the_guard_and_small_settings():
    model = tiny_model("llama", attn="eager")
    prompt = repetitive(4)
    drafter = Lookahead(branch_length=3, max_prefix=2, budget=4, max_trie_nodes=100)
    assert torch.equal(run(model, prompt, drafter, MAX_NEW, guard=True)[0], reference(model, prompt, MAX_NEW))
    assert drafter.trie.size <= 100


def test_trie_counts_every_window_up_to_its_length():
    trie = TokenTrie(window=3, max_nodes=1000)
    trie.insert([1, 2, 3, 1, 2, 4])
    assert trie.count([1]) == 2 and trie.count([1, 2]) == 2
    assert trie.count([1, 2, 3]) == 1 and trie.count([1, 2, 4]) == 1 and trie.count([2, 3, 1]) == 1
    assert trie.count([1, 2, 3, 1]) == 0  # longer than the window: not stored
    assert max(len(p) for p in contents(trie)) == 3
    assert trie.size == len(contents(trie))


@pytest.mark.parametrize("cut", [[1], [3, 4], [2, 5, 9], list(range(1, 12))])
def test_incremental_insertion_equals_one_pass(cut):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 5, (12,), generator=g).tolist()
    whole = TokenTrie(window=4, max_nodes=1000)
    whole.insert(ids)
    parts = TokenTrie(window=4, max_nodes=1000)
    bounds = [0, *cut, len(ids)]
    for a, b in zip(bounds, bounds[1:]):
        parts.insert(ids[a:b], ids[:a])
    assert contents(parts) == contents(whole)


def test_observe_inserts_only_new_tokens():
    d = Lookahead(branch_length=2, max_prefix=1)
    d.observe(torch.tensor([1, 2, 3, 4]))
    d.observe(torch.tensor([1, 2, 3, 4]))  # the same text: counted once
    d.observe(torch.tensor([1, 2, 3]))  # a rollback: nothing new
    assert d.trie.count([1, 2, 3]) == 1 and d.trie.count([3, 4]) == 1
    d.observe(torch.tensor([1, 2, 3, 5]))  # a new prompt sharing a prefix: only the new part
    assert d.trie.count([1, 2, 3]) == 1 and d.trie.count([2, 3, 5]) == 1 and d.trie.count([3]) == 1
    d.observe(torch.tensor([1, 2, 3, 5, 1, 2]))  # generated tokens as they are committed
    assert d.trie.count([5, 1, 2]) == 1 and d.trie.count([1, 2]) == 2


def test_pruning_bounds_the_trie_and_keeps_frequent_and_recent_text():
    g = torch.Generator().manual_seed(0)
    trie = TokenTrie(window=3, max_nodes=60)
    stream = []
    for i in range(150):
        stream += torch.randint(10, 90, (3,), generator=g).tolist() + ([7, 8, 9] if i % 2 else [])
    for a in range(0, len(stream), 5):
        trie.insert(stream[a : a + 5], stream[:a])
        assert trie.size <= 60 and trie.size == len(contents(trie))
    assert trie.count([7, 8, 9]) > 0  # the frequent n-gram survives every prune
    assert trie.find(stream[-3:]) is not None  # so does the latest text
    assert all(count > 0 for count in contents(trie).values())
    with pytest.raises(ValueError, match="max_trie_nodes"):
        TokenTrie(window=3, max_nodes=20)


def test_branches_by_frequency_with_scores():
    d = Lookahead(branch_length=2, max_prefix=2, budget=8, token_cost=0)
    tree = d.propose(Context(torch.tensor([1, 2, 3, 7, 1, 2, 3, 8, 1, 2, 4, 9, 1, 2])))
    # "1 2" occurred 4 times: followed by 3 twice, by 4 once (and now)
    first = {int(tree.tokens[c]): float(tree.scores[c]) for c in tree.children(-1)}
    assert first == {3: 0.5, 4: 0.25} and int(tree.tokens[0]) == 3
    second = {tuple(tree.tokens[tree.path_to(i)].tolist()): float(tree.scores[i]) for i in range(len(tree))}
    assert second[(3, 7)] == 0.25 and second[(3, 8)] == 0.25 and second[(4, 9)] == 0.25
    assert len(tree) == 5
    assert all(tree.scores[i] <= tree.scores[p] for i, p in enumerate(tree.parents.tolist()) if p >= 0)


def test_budget_and_depth_limits():
    ids = torch.tensor(list(range(20)) * 3 + list(range(5)))
    d = Lookahead(branch_length=6, max_prefix=3, budget=4, token_cost=0)
    assert len(d.propose(Context(ids))) == 4
    d = Lookahead(branch_length=6, max_prefix=3, budget=30, token_cost=0)
    tree = d.propose(Context(ids))
    assert len(tree) == 6 and tree.tokens.tolist() == [5, 6, 7, 8, 9, 10]  # branch_length deep
    assert int(d.propose(Context(ids, max_depth=2)).depths().max()) == 2
    assert len(d.propose(Context(torch.tensor([50, 51, 52])))) == 0  # nothing matches


def test_the_cost_curve_sizes_the_tree():
    # After "1 2 3": "4 9 ..." three times (chance 3/7 per node), 5, 6 and 7 once each (1/7).
    ids = torch.tensor([1, 2, 3, 4, 9] * 3 + [1, 2, 3, 5, 1, 2, 3, 6, 1, 2, 3, 7, 1, 2, 3])
    make = lambda: Lookahead(branch_length=8, max_prefix=3, budget=16)  # noqa: E731
    flat = make().propose(Context(ids, verify_cost=lambda n: 1.0))
    steep = make().propose(Context(ids, verify_cost=lambda n: 1.0 + 3.0 * n))
    # The default curve, 1 + 0.2 n, buys the 3/7 spine "4 9 1 2 3"; below it "4" follows 2 of 3
    # times (chance 2/7), which no longer pays at 0.2 per node once 5 nodes of 3/7 are in.
    default = make().propose(Context(ids))
    assert len(flat) == 16 and len(steep) == 0
    assert default.tokens.tolist() == [4, 9, 1, 2, 3] and default.is_chain
    assert torch.allclose(default.scores, torch.full((5,), 3 / 7, dtype=torch.float64))
    assert {round(float(s) * 7) for s in flat.scores} == {3, 2, 1}


def test_calibration_shrinks_trees_the_target_rejects_and_recovers():
    ids = torch.tensor([1, 2, 3, 4, 5, 6] * 4 + [1, 2])
    d = Lookahead(budget=8)
    first = len(d.propose(Context(ids)))
    for _ in range(30):  # the target never agrees
        tree = d.propose(Context(ids))
        d.update(Feedback(tree, [], torch.tensor([0])))
    assert first > 0 and len(d.propose(Context(ids))) < first
    assert any(len(d.propose(Context(ids))) for _ in range(200))  # re-probed later
    for _ in range(40):  # the target agrees with every branch
        tree = d.propose(Context(ids))
        d.update(Feedback(tree, tree.path_to(len(tree) - 1) if len(tree) else [], torch.zeros(len(tree) + 1)))
    assert len(d.propose(Context(ids))) >= first


def test_trie_persists_across_calls_without_double_counting():
    model = tiny_model("qwen")
    d = Lookahead()
    prompt = random_prompt(7, 10)
    out, first = run(model, prompt, d, max_new=30)
    generated = out[0, prompt.shape[1] :].tolist()
    assert d.trie.count(generated[-8:-4]) >= 1  # committed output went into the trie
    out2, second = run(model, prompt, d, max_new=30)  # the same request again
    assert torch.equal(out2, out) and torch.equal(out, reference(model, prompt, 30))
    # Counted once; the last step's tokens reach no propose (the call ends), so they wait for a
    # later context that holds them, e.g. the next turn of a chat.
    once = TokenTrie(d.trie.window, d.trie.max_nodes)
    once.insert(out[0, : out.shape[1] - len(second.steps[-1].new_tokens)].tolist())
    assert contents(d.trie) == contents(once)
    assert len(second.steps[0].tree) > 0 and second.mean_accepted > max(first.mean_accepted, 2.0)


def test_a_new_vocabulary_clears_the_trie():
    d = Lookahead()
    run(tiny_model("llama"), repetitive(2), d, max_new=10)
    assert d.trie.size > 0
    small = tiny_model("llama", vocab=64)
    d.begin(small)
    assert d.trie.size == 0 and d.stats == {}
    prompt = random_prompt(3, 9, vocab=64)
    assert torch.equal(run(small, prompt, d, max_new=20)[0], reference(small, prompt, 20))


def test_arguments_are_validated():
    for kwargs, word in (
        (dict(branch_length=0), "branch_length"), (dict(budget=0), "budget"),
        (dict(min_prefix=3, max_prefix=2), "min_prefix"), (dict(min_prefix=0), "min_prefix"),
        (dict(token_cost=-0.5), "token_cost"), (dict(max_trie_nodes=10), "max_trie_nodes"),
    ):
        with pytest.raises(ValueError, match=word):
            Lookahead(**kwargs)
    assert VOCAB > 64  # the vocabulary-change test needs a smaller second vocabulary
