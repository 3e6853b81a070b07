"""Tree properties without models (hypothesis over random parent arrays)."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from specdec.trees import TokenTree, expand, tree_mask, verify_inputs

SETTINGS = settings(max_examples=60, deadline=None)


@st.composite
def trees(draw, max_nodes=12):
    n = draw(st.integers(0, max_nodes))
    parents = [draw(st.integers(-1, i - 1)) for i in range(n)]
    tokens = draw(st.lists(st.integers(0, 50), min_size=n, max_size=n))
    return TokenTree(torch.tensor(tokens, dtype=torch.long), torch.tensor(parents, dtype=torch.long))


@SETTINGS
@given(trees())
def test_ancestor_mask_rows_are_paths(tree):
    mask = tree.ancestor_mask()
    n = len(tree)
    assert mask.shape == (n, n)
    assert bool(mask.diagonal().all()) if n else True
    for i in range(n):
        assert torch.nonzero(mask[i]).flatten().tolist() == sorted(tree.path_to(i))
    assert torch.equal(tree.depths(), mask.sum(1)) if n else True
    assert not bool(mask.triu(1).any())  # topological order: no node sees a later one


@SETTINGS
@given(st.integers(0, 10))
def test_chain_is_a_tree_with_causal_mask(k):
    tree = TokenTree.chain(torch.arange(k))
    assert tree.is_chain
    assert tree.parents.tolist() == list(range(-1, k - 1))
    assert torch.equal(tree.ancestor_mask(), torch.ones(k, k, dtype=torch.bool).tril())
    assert tree.depths().tolist() == list(range(1, k + 1))


@SETTINGS
@given(trees(), st.integers(0, 6), st.integers(1, 4))
def test_verify_inputs(tree, prefix, root):
    inputs = verify_inputs(root, tree, prefix, torch.float32)
    n = len(tree)
    assert inputs.input_ids.tolist() == [[root] + tree.tokens.tolist()]
    assert inputs.position_ids.tolist() == [[prefix] + (prefix + tree.depths()).tolist()]
    if tree.is_chain:  # the tree mask of a chain is the causal mask: the model builds it itself
        assert inputs.attention_mask is None
        return
    mask = inputs.attention_mask
    assert mask.shape == (1, 1, n + 1, prefix + n + 1) and mask.dtype == torch.float32
    allowed = mask[0, 0] == 0
    assert bool(allowed[:, : prefix + 1].all())  # everyone sees the prefix and the root
    assert torch.equal(allowed[1:, prefix + 1 :], tree.ancestor_mask())
    assert not bool(allowed[0, prefix + 1 :].any())  # the root sees no draft
    assert set(mask.unique().tolist()) <= {0.0, torch.finfo(torch.float32).min}  # additive, never bool or 1/0


@SETTINGS
@given(trees(), st.data())
def test_subtree_and_truncate(tree, data):
    if len(tree):
        node = data.draw(st.integers(0, len(tree) - 1))
        keep = tree.path_to(node)
        sub = tree.subtree(keep)
        assert sub.is_chain and sub.tokens.tolist() == tree.tokens[keep].tolist()
    depth = data.draw(st.integers(0, 5))
    cut = tree.truncate(depth)
    assert len(cut) == int((tree.depths() <= depth).sum())
    assert all(d <= depth for d in cut.depths().tolist())


@SETTINGS
@given(st.lists(st.lists(st.integers(0, 5), min_size=1, max_size=5), max_size=6))
def test_from_sequences_is_a_trie(seqs):
    tree = TokenTree.from_sequences(seqs)
    paths = {tuple(tree.tokens[tree.path_to(i)].tolist()) for i in range(len(tree))}
    prefixes = {tuple(s[:k]) for s in seqs for k in range(1, len(s) + 1)}
    assert paths == prefixes and len(tree) == len(prefixes)  # each prefix exactly once


def test_bad_parents_raise():
    for parents in ([0], [-1, 1], [-2]):
        try:
            TokenTree(torch.zeros(len(parents), dtype=torch.long), torch.tensor(parents))
        except ValueError as err:
            assert "parents" in str(err)
        else:
            raise AssertionError(f"parents {parents} accepted")


def _fake_step(vocab=7):
    """Deterministic draft log-probs that depend on each frontier node's whole path."""

    def step(tree, frontier):
        rows = []
        for node in frontier:
            path = tuple(tree.tokens[tree.path_to(node)].tolist()) if node >= 0 else ()
            g = torch.Generator().manual_seed(hash(path) % 2**31)
            rows.append(torch.log_softmax(torch.randn(vocab, generator=g) * 2, -1))
        return torch.stack(rows)

    return step


@SETTINGS
@given(st.integers(1, 4), st.integers(1, 3), st.integers(1, 4), st.integers(1, 12))
def test_expand_keeps_best_nodes_closed_under_ancestors(depth, topk, width, budget):
    tree = expand(_fake_step(), depth=depth, topk=topk, width=width, budget=budget)
    assert len(tree) <= budget and int(tree.depths().max()) <= depth
    assert tree.draft_probs is None  # deterministic top-k drafts: one-hot for lossless sampling
    for i in range(len(tree)):  # siblings are distinct tokens
        sibs = [tree.tokens[c].item() for c in tree.children(int(tree.parents[i]))]
        assert len(sibs) == len(set(sibs))


def test_expand_with_topk_1_is_a_greedy_chain():
    step = _fake_step()
    tree = expand(step, depth=4, topk=1)
    assert tree.is_chain and len(tree) == 4
    for i in range(4):  # each token is the argmax after its path
        parent = i - 1
        assert tree.tokens[i] == step(tree.subtree(range(i)) if i else TokenTree.empty(), [parent])[0].argmax()


def test_expand_over_a_draft_vocabulary_maps_columns_to_token_ids():
    """With `vocab`, column j of the step's output is token vocab[j]: the same tree as a full-vocabulary
    step that scores only those tokens (the rest at -inf)."""
    vocab = torch.tensor([7, 2, 11, 5, 9])
    full = _fake_step(vocab=12)

    def full_masked(tree, frontier):
        out = torch.full((len(frontier), 12), float("-inf"))
        out[:, vocab] = full(tree, frontier)[:, vocab]
        return out

    small = expand(lambda tree, frontier: full(tree, frontier)[:, vocab], depth=3, topk=2, vocab=vocab)
    ref = expand(full_masked, depth=3, topk=2)
    assert torch.equal(small.tokens, ref.tokens) and torch.equal(small.parents, ref.parents)
    assert set(small.tokens.tolist()) <= set(vocab.tolist())


def test_tree_mask_for_partial_feeding():
    tree = TokenTree(torch.tensor([1, 2, 3, 4]), torch.tensor([-1, -1, 0, 1]))
    mask = tree_mask(tree, torch.tensor([2, 3]), cached_nodes=2, prefix_len=3, dtype=torch.float64)
    allowed = (mask[0, 0] == 0).int().tolist()
    assert allowed == [[1, 1, 1, 1, 0, 1, 0], [1, 1, 1, 0, 1, 0, 1]]


def test_expand_stops_below_min_confidence():
    confident = torch.log(torch.tensor([0.9, 0.05, 0.05]))
    unsure = torch.log(torch.tensor([0.4, 0.3, 0.3]))

    def step(tree, frontier):  # depths 1 and 2 are confident, depth 3 is not
        return torch.stack([confident if len(tree) < 2 else unsure for _ in frontier])

    assert len(expand(step, depth=5, topk=1, min_confidence=0.5)) == 2
    assert len(expand(step, depth=5, topk=1)) == 5
    assert len(expand(lambda tree, frontier: torch.stack([unsure]), depth=5, topk=1, min_confidence=0.5)) == 0


def test_expand_stops_once_no_frontier_node_reaches_min_score():
    confident = torch.log(torch.tensor([0.9, 0.05, 0.05]))  # cumulative scores 0.9, 0.81, 0.729, 0.656, ...
    calls = []

    def step(tree, frontier):
        calls.append(len(frontier))
        return torch.stack([confident for _ in frontier])

    tree = expand(step, depth=6, topk=1, min_score=0.7)
    assert len(tree) == 4 and len(calls) == 4  # the level at 0.656 is kept, no step runs below it
    assert tree.scores.min() < 0.7 <= tree.scores[:3].min()
    calls.clear()
    assert len(expand(step, depth=6, topk=2, width=2, min_score=0.0)) == 12 and len(calls) == 6
