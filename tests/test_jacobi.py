"""The `Jacobi` (lookahead decoding) drafter: pool, window and iterate bookkeeping, and exactness."""

import pytest
import torch

import specdec
from conftest import random_prompt, reference, tiny_model
from specdec.drafter import Context, Feedback
from specdec.drafters.jacobi import Jacobi
from specdec.trees import LinearCost, TokenTree


def paths(tree: TokenTree) -> set[tuple[int, ...]]:
    return {tuple(tree.tokens[tree.path_to(i)].tolist()) for i in range(len(tree)) if not tree.children(i)}


def chain_feedback(tree: TokenTree, accepted: int, top: list[int]) -> Feedback:
    """The target accepted the first `accepted` nodes of the chain and answered `top` (its top-1
    after the root and after each node) at every row."""
    path = list(range(accepted))
    new = tree.tokens[path].tolist() + [top[accepted]]
    return Feedback(tree, path, torch.tensor(new), torch.tensor(top)[:, None])


def test_pool_keeps_the_most_recent_per_key():
    d = Jacobi(max_candidates=2, pool_size=3)
    for cont in [(1, 2), (3, 4), (1, 2), (5, 6), (7, 8)]:
        d.add(9, cont)
    assert list(d.pool[9]) == [(1, 2), (5, 6), (7, 8)]  # (3, 4) was the oldest when the 4th arrived
    assert d.candidates(9) == [((7, 8), 1.0), ((5, 6), 1.0)]
    assert d.pool[9][(1, 2)] == 2.0 and d.candidates(4) == []


def nodes_of(tree: TokenTree, seq) -> list[int] | None:
    """The nodes spelling `seq` from the root, or None if the tree has no such path."""
    nodes, node = [], -1
    for tok in seq:
        node = next((c for c in tree.children(node) if int(tree.tokens[c]) == tok), None)
        if node is None:
            return None
        nodes.append(node)
    return nodes


def test_committed_text_fills_the_pool_once():
    d = Jacobi(ngram=3)
    d.propose(Context(torch.tensor([1, 2, 3, 1, 2])))
    assert {k: dict(v) for k, v in d.pool.items()} == {1: {(2, 3): 1.0}, 2: {(3, 1): 1.0}, 3: {(1, 2): 1.0}}
    d.propose(Context(torch.tensor([1, 2, 3, 1, 2])))  # nothing new: nothing counted twice
    assert d.pool[1][(2, 3)] == 1.0
    d.propose(Context(torch.tensor([1, 2, 3, 1, 2, 3])))  # one new token: one new n-gram (1, 2, 3)
    assert d.pool[1][(2, 3)] == 2.0
    d.propose(Context(torch.tensor([7, 7, 7])))  # another text: reconciled, indexed from its start
    assert (7, 7) in d.pool[7]


def test_tree_is_pool_trie_plus_lookahead_chain():
    d = Jacobi(window=3, ngram=3, max_candidates=3)
    ids = torch.tensor([4, 5, 6, 4, 5, 7, 4, 8, 9, 4])  # after 4: (5, 6), (5, 7), (8, 9)
    tree = d.propose(Context(ids, verify_cost=LinearCost(0.0)))  # free verification: every candidate goes
    chain = d.guess.tokens.tolist()
    assert d.guess.start == ids.numel() and len(chain) == 3 and not d.guess.predicted.any()
    assert set(chain) <= set(ids.tolist())  # guesses start as context tokens
    pool_nodes = set()
    for cand in [(5, 6), (5, 7), (8, 9)]:
        pool_nodes |= set(nodes_of(tree, cand))
    assert len(pool_nodes) == 5  # (5, 6) and (5, 7) share their first node
    chain_nodes = nodes_of(tree, chain)
    assert chain_nodes is not None and len(tree) == len(pool_nodes | set(chain_nodes))
    scores, depths = tree.scores, tree.depths()
    assert bool(((scores >= 0) & (scores <= 1)).all())
    for i, p in enumerate(tree.parents.tolist()):
        assert p < 0 or scores[i] <= scores[p]
    for i in set(chain_nodes) - pool_nodes:  # the lookahead chain ranks below the pool, depth by depth
        assert all(scores[i] < scores[j] for j in pool_nodes if depths[j] == depths[i])
    assert int(depths.max()) == 3
    assert int(d.propose(Context(ids, max_depth=1)).depths().max()) == 1
    assert len(d.propose(Context(ids, max_depth=0))) == 0


def test_window_shifts_and_iterates_fill_the_pool():
    d = Jacobi(window=3, ngram=3, max_candidates=0)
    tree = d.propose(Context(torch.tensor([10, 11, 12])))
    g = d.guess.tokens.tolist()  # guesses for positions 3, 4, 5
    assert tree.tokens.tolist() == g and tree.is_chain
    # Nothing accepted; the target's top-1 is 50 after the root, 51, 52, 53 after the chain nodes.
    d.update(chain_feedback(tree, 0, [50, 51, 52, 53]))
    assert d.guess.start == 4 and d.guess.tokens.tolist() == [51, 52, 53] and d.guess.predicted.all()
    assert [lvl.tokens.tolist() for lvl in d.levels] == [g]
    tree = d.propose(Context(torch.tensor([10, 11, 12, 50])))
    assert tree.tokens.tolist() == [51, 52, 53]
    before = {(k, c) for k, v in d.pool.items() for c in v}
    # 51 accepted, then the target says 60; the iterate at positions 4..7 is 51, 60, 61, 62
    d.update(chain_feedback(tree, 1, [51, 60, 61, 62]))
    added = {(k, c) for k, v in d.pool.items() for c in v} - before
    # the diagonals of g (positions 3..5), [51, 52, 53] (4..6) and [51, 60, 61, 62] (4..7)
    assert added == {(g[0], (51, 60)), (g[1], (52, 61)), (g[2], (53, 62))}
    # two tokens committed (51, 60): the window starts at 6 with what the iterate says there
    assert d.guess.start == 6 and d.guess.tokens.tolist() == [61, 62]
    assert [lvl.tokens.tolist() for lvl in d.levels] == [[51, 52, 53]]
    tree = d.propose(Context(torch.tensor([10, 11, 12, 50, 51, 60])))
    assert tree.tokens[:2].tolist() == [61, 62] and d.guess.predicted.tolist() == [True, True, False]


def test_random_fills_never_count_as_iterates():
    d = Jacobi(window=3, ngram=3, max_candidates=0)
    tree = d.propose(Context(torch.tensor([10, 11, 12])))
    g = d.guess.tokens.tolist()  # random fills at positions 3, 4, 5
    # Only the chain's first node was verified (a budget cut the rest): iterate 70 @ 3, 71 @ 4.
    cut = tree.subtree([0])
    d.update(Feedback(cut, [], torch.tensor([70]), torch.tensor([[70], [71]])))
    assert d.guess.start == 4 and d.guess.tokens.tolist() == [71, g[2]]
    assert d.guess.predicted.tolist() == [True, False]  # g[2] is still a fill
    tree = d.propose(Context(torch.tensor([10, 11, 12, 70])))
    before = {(k, c) for k, v in d.pool.items() for c in v}
    d.update(chain_feedback(tree, 0, [80, 81, 82, 83]))  # iterate: 80 @ 4, 81 @ 5, 82 @ 6, 83 @ 7
    added = {(k, c) for k, v in d.pool.items() for c in v} - before
    # (g[0] @ 3, 71 @ 4, 81 @ 5) is an n-gram; (g[1] @ 4, g[2] @ 5, 82 @ 6) is not: g[2] was never predicted
    assert added == {(g[0], (71, 81))}


def test_a_dropped_chain_only_shifts_the_window():
    d = Jacobi(window=3, ngram=3, max_candidates=0)
    tree = d.propose(Context(torch.tensor([10, 11, 12])))
    g = d.guess.tokens.tolist()
    d.update(Feedback(TokenTree.empty(), [], torch.tensor([40, 41]), torch.tensor([[40]])))  # another drafter's path
    assert d.guess.start == 5 and d.guess.tokens.tolist() == g[2:]
    tree = d.propose(Context(torch.tensor([1, 2])))  # a new prompt: the window starts over
    assert d.guess.start == 2 and d.levels == [] and len(tree) == 3


def test_verify_cost_sizes_the_pool_part():
    ids = torch.tensor([4, 5, 6, 4, 5, 7, 4, 8, 9, 4])
    flat = Jacobi(window=2, ngram=3, max_candidates=3).propose(Context(ids, verify_cost=lambda n: 1.0))
    steep = Jacobi(window=2, ngram=3, max_candidates=3).propose(Context(ids, verify_cost=lambda n: 1.0 + 5.0 * n))
    default = Jacobi(window=2, ngram=3, max_candidates=3).propose(Context(ids))  # the core's default curve
    assert len(flat) == 6 and len(flat) >= len(default) >= len(steep) >= 2  # the chain always goes
    assert len(flat) > len(steep)


def test_arguments_are_validated():
    bad = [(dict(window=0), "window"), (dict(ngram=1), "ngram"), (dict(max_candidates=-1), "max_candidates")]
    for kwargs, word in bad:
        with pytest.raises(ValueError, match=word):
            Jacobi(**kwargs)


def run(model, prompt, drafter, max_new=32):
    stats = specdec.GenerationStats()
    out = specdec.generate(model, prompt, drafter, max_new_tokens=max_new, eos_token_id=[], stats=stats, guard=None)
    return out, stats


@pytest.mark.parametrize("arch", ["llama", "qwen"])
@pytest.mark.parametrize(
    "kwargs", [dict(), dict(window=2, ngram=2, max_candidates=1), dict(window=7, ngram=5, max_candidates=7)]
)
def test_exact(arch, kwargs):
    model = tiny_model(arch)
    prompt = random_prompt(11, 10)
    out, stats = run(model, prompt, Jacobi(**kwargs))
    assert torch.equal(out, reference(model, prompt, 32))


@pytest.mark.parametrize("arch", ["llama", "qwen"])
def test_repetitive_text_is_drafted(arch):
    model = tiny_model(arch)
    prompt = torch.tensor([[5, 6, 7, 8, 9, 10] * 5])
    drafter = Jacobi()
    out, stats = run(model, prompt, drafter, max_new=40)
    assert torch.equal(out, reference(model, prompt, 40))
    assert stats.mean_accepted > 1.3
    assert drafter.acceptance("pool") > drafter.acceptance("chain")
