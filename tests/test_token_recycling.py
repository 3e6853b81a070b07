"""Token recycling: exact outputs, the successor table's updates, the template walk and its
data-driven size, persistence across calls and a vocabulary change."""

import numpy as np
import pytest
import torch

import specdec
from conftest import VOCAB, random_prompt, reference, repetitive, run, tiny_model
from specdec.drafter import Context, Feedback
from specdec.drafters.token_recycling import DEFAULT_TEMPLATE, TokenRecycling

MAX_NEW = 40


@pytest.mark.parametrize("arch", ["llama", "qwen"])
def test_exact_and_accepting(arch):
    model = tiny_model(arch)
    drafter = TokenRecycling()  # one drafter for every prompt: the table carries over
    for seed in range(3):
        for prompt, is_repetitive in ((random_prompt(seed, 8), False), (repetitive(seed), True)):
            ref = reference(model, prompt, MAX_NEW)
            out, stats = run(model, prompt, drafter, MAX_NEW)
            assert torch.equal(out, ref), (seed, is_repetitive)
            if is_repetitive:
                assert stats.mean_accepted > 1.0, seed
    assert drafter.verified.sum() > 0  # the verifier's top-k reached the table


def test_exact_with_the_guard_and_a_fresh_drafter():
    model = tiny_model("qwen", attn="eager")
    prompt = repetitive(5)
    out, _ = run(model, prompt, TokenRecycling(topk=4, max_nodes=8), MAX_NEW, guard=True)
    assert torch.equal(out, reference(model, prompt, MAX_NEW))


def fresh(**kw):
    drafter = TokenRecycling(**kw)
    drafter.begin(tiny_model())
    return drafter


def test_update_writes_the_target_topk_for_root_and_every_node():
    d = fresh(topk=3, template=[(0,), (1,), (0, 0)], reshape_every=None)
    d.succ[7], d.succ[10] = [10, 11, 12], [20, 21, 22]
    d.verified[[7, 10]] = True
    tree = d.propose(Context(torch.tensor([1, 2, 7])))
    assert tree.tokens.tolist() == [10, 11, 20] and tree.parents.tolist() == [-1, -1, 0]
    top = torch.tensor([[30, 31, 32], [40, 41, 42], [50, 51, 52], [60, 61, 62]])  # root, then each node
    d.update(Feedback(tree, [0], torch.tensor([10, 40]), top))
    for token, row in ((7, 0), (10, 1), (11, 2), (20, 3)):
        assert d.succ[token].tolist() == top[row].tolist()
    assert d.verified[[7, 10, 11, 20]].all() and d.verified.sum() == 4


def test_the_committed_context_wins_a_duplicate_token():
    d = fresh(topk=2, template=[(0,), (1,), (0, 0)], reshape_every=None)
    d.succ[7], d.succ[10], d.succ[11] = [11, 10], [5, 6], [10, 9]
    d.verified[[7, 10, 11]] = True
    tree = d.propose(Context(torch.tensor([7])))
    assert tree.tokens.tolist() == [11, 10, 10]  # token 10 twice: under the root and under 11
    top = torch.tensor([[1, 2], [3, 4], [5, 6], [8, 9]])
    d.update(Feedback(tree, [1], torch.tensor([10, 5]), top))  # the earlier node 10 is accepted
    assert d.succ[10].tolist() == [5, 6]  # its row (2) wins over the later, rejected one (3)
    tree = d.propose(Context(torch.tensor([7, 10, 5])))  # the root is 5 now
    d.update(Feedback(tree, [], torch.tensor([1]), torch.tensor([[1, 2]] * (len(tree) + 1))))
    assert d.succ[5].tolist() == [1, 2]


def test_a_narrow_target_topk_clears_the_rest_of_the_row():
    d = fresh(topk=3, reshape_every=None)
    d.succ[7] = [1, 2, 3]
    d.propose(Context(torch.tensor([7])))
    d.update(Feedback(specdec.TokenTree.empty(), [], torch.tensor([4]), torch.tensor([[4, 5]])))
    assert d.succ[7].tolist() == [4, 5, -1]


def test_bigrams_fill_only_rows_the_target_never_wrote():
    d = fresh(topk=3, reshape_every=None)
    d.propose(Context(torch.tensor([1, 2, 1, 3, 1, 2])))
    assert d.succ[1].tolist() == [2, 3, -1]  # most recent successor first, no duplicates
    assert d.succ[2].tolist() == [1, -1, -1] and d.succ[3].tolist() == [1, -1, -1]
    before = d.succ.copy()
    d.propose(Context(torch.tensor([1, 2, 1, 3, 1, 2])))  # nothing new: nothing changes
    d.propose(Context(torch.tensor([1, 2, 1])))  # a rollback neither
    assert np.array_equal(d.succ, before)
    d.succ[1], d.verified[1] = [40, 41, 42], True  # as if the target predicted after token 1
    d.propose(Context(torch.tensor([1, 2, 1, 3, 1, 2, 1, 9, 2, 5])))
    assert d.succ[1].tolist() == [40, 41, 42]  # the target's row is kept
    assert d.succ[2].tolist() == [5, 1, -1] and d.succ[9].tolist() == [2, -1, -1]


def test_template_walk_skips_unknown_subtrees_and_respects_max_depth():
    template = [(0,), (1,), (0, 0), (1, 0), (0, 0, 0), (1, 0, 0)]
    d = fresh(topk=2, template=template, reshape_every=None)
    d.succ[5], d.succ[20], d.succ[30] = [10, 20], [30, -1], [40, 41]
    d.verified[[5, 20, 30]] = True
    d.succ[10] = -1  # unknown: (0, 0) and (0, 0, 0) are dropped
    d.verified[10] = True
    tree = d.propose(Context(torch.tensor([5])))
    assert tree.tokens.tolist() == [10, 20, 30, 40] and tree.parents.tolist() == [-1, -1, 1, 2]
    chance = d.estimates()
    expected = [chance[0, 0], chance[0, 1], chance[0, 1] * chance[1, 0], chance[0, 1] * chance[1, 0] * chance[2, 0]]
    torch.testing.assert_close(tree.scores, torch.tensor(expected, dtype=torch.float64))
    assert all(tree.scores[i] <= tree.scores[p] for i, p in enumerate(tree.parents.tolist()) if p >= 0)
    shallow = d.propose(Context(torch.tensor([5]), max_depth=2))
    assert shallow.tokens.tolist() == [10, 20, 30] and int(shallow.depths().max()) == 2
    d.succ[5] = -1
    assert len(d.propose(Context(torch.tensor([5])))) == 0


def simulate(d, steps, next_of, topk_of, prompt):
    """Drive the drafter with a scripted greedy target: the text continues x with next_of(x), and
    the target's top-k after x is topk_of(x). Acceptance follows the tree as the verifier does."""
    ids = list(prompt)
    for _ in range(steps):
        tree = d.propose(Context(torch.tensor(ids)))
        accepted, node, tok = [], -1, next_of(ids[-1])
        while True:
            hit = [c for c in tree.children(node) if int(tree.tokens[c]) == tok]
            if not hit:
                break
            accepted.append(hit[0])
            node, tok = hit[0], next_of(tok)
        new = [int(tree.tokens[i]) for i in accepted] + [tok]
        rows = [ids[-1]] + tree.tokens.tolist()
        d.update(Feedback(tree, accepted, torch.tensor(new), torch.tensor([topk_of(x) for x in rows])))
        ids += new
    return ids


def walk(next_of, start, n):
    ids = [start]
    while len(ids) < n:
        ids.append(next_of(ids[-1]))
    return ids


def test_shape_grows_where_the_table_predicts_and_shrinks_where_it_does_not():
    nxt = lambda x: (x + 1) % VOCAB  # noqa: E731
    good = fresh(topk=4, max_nodes=16)
    start = max(len(p) for p in good.template)
    simulate(good, 60, nxt, lambda x: [(x + 1 + r) % VOCAB for r in range(4)], walk(nxt, 0, VOCAB + 3))
    assert max(len(p) for p in good.template) > start  # deeper than the start shape
    assert good.estimates()[:6, 0].min() > 0.8
    tree = good.propose(Context(torch.tensor([3])))
    assert int(tree.depths().max()) == good.depth and tree.tokens[tree.path_to(len(tree) - 1)].tolist()[0] == 4

    g = torch.Generator().manual_seed(0)
    text = torch.randint(0, VOCAB, (VOCAB,), generator=g).tolist()
    bad = fresh(topk=4, max_nodes=16)
    # The text is a fixed random map that the prompt's bigrams show, but the target's top-k never
    # contains the committed token: once the target's rows replace the bigrams, nothing is accepted.
    simulate(bad, 60, lambda x: text[x], lambda x: [(text[x] + 1 + r) % VOCAB for r in range(4)],
             walk(lambda x: text[x], 3, 40))
    assert bad.estimates()[0].sum() < 0.2
    assert len(bad.template) < len(DEFAULT_TEMPLATE)


def test_the_cost_curve_sizes_the_template():
    nxt = lambda x: (x + 1) % VOCAB  # noqa: E731
    d = fresh(topk=4, max_nodes=24)
    simulate(d, 40, nxt, lambda x: [(x + 1 + r) % VOCAB for r in range(4)], walk(nxt, 0, VOCAB + 3))
    d.reshape(lambda n: 1.0)
    flat = len(d.template)
    d.reshape(lambda n: 1.0 + 1.0 * n)
    steep = len(d.template)
    assert flat == 24 and steep < flat
    d._stale = True  # the context's curve is the one used when the shape is recomputed
    d.propose(Context(torch.tensor([3]), verify_cost=lambda n: 1.0))
    assert len(d.template) == 24


def test_counts_cover_ranks_outside_the_template():
    d = fresh(topk=4, template=[(0,)])
    # The target always continues with what its rows hold at rank 2, which the template lacks.
    nxt = lambda x: (x + 3) % VOCAB  # noqa: E731
    simulate(d, 60, nxt, lambda x: [(x + 1 + r) % VOCAB for r in range(4)], [0, 3])
    chance = d.estimates()
    assert chance[0, 2] > 0.8 and chance[0, 0] < 0.1
    assert (2,) in d.template


def test_table_and_counts_persist_across_generate_calls():
    model = tiny_model("llama")
    d = TokenRecycling()
    prompt = random_prompt(11, 10)
    ref = reference(model, prompt, 30)
    _, first = run(model, prompt, d, max_new=30)
    table, trials = d.succ.copy(), d.trials.copy()
    d.begin(model)
    assert np.array_equal(d.succ, table) and np.array_equal(d.trials, trials)
    out, second = run(model, prompt, d, max_new=30)
    assert torch.equal(out, ref)
    assert len(second.steps[0].tree) > 0 and second.mean_accepted > first.mean_accepted


def test_a_new_vocabulary_reallocates_the_table():
    d = TokenRecycling(topk=4)
    run(tiny_model("llama"), repetitive(1), d, max_new=10)
    assert d.succ.shape == (VOCAB, 4)
    assert d.trials.sum() > 0
    small = tiny_model("llama", vocab=64)
    d.begin(small)
    assert d.succ.shape == (64, 4) and d.succ.dtype == np.int32 and (d.succ == -1).all() and d.trials.sum() == 0
    prompt = random_prompt(2, 9, vocab=64)
    out, _ = run(small, prompt, d, max_new=20)
    assert torch.equal(out, reference(small, prompt, 20))


def test_arguments_are_validated():
    for kwargs, word in (
        (dict(topk=0), "topk"), (dict(max_nodes=0), "max_nodes"), (dict(depth=0), "depth"),
        (dict(reshape_every=0), "reshape_every"), (dict(decay=0), "decay"), (dict(token_cost=-1), "token_cost"),
        (dict(topk=2, template=[(0,), (2,)]), "ranks < topk"), (dict(template=[(0, 0)]), "parents-first"),
        (dict(max_nodes=2, template=[(0,), (1,), (2,)]), "max_nodes"),
    ):
        with pytest.raises(ValueError, match=word):
            TokenRecycling(**kwargs)
    with pytest.raises(RuntimeError, match="begin"):
        TokenRecycling().propose(Context(torch.tensor([1])))
    assert TokenRecycling(topk=5).feedback_topk == 5
