"""Composed drafters: `specdec.trees.merge` (the trie union under a budget), `Merge` and `Fallback`.

Exactness against `model.generate`, and the feedback each inner drafter sees: its own kept
subtree, its own accepted path, the step's tokens and the target's top-k rows for its nodes.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import specdec
from conftest import VOCAB, random_prompt, reference, tiny_model
from specdec.acceptance import Speculative
from specdec.drafter import Context, Feedback
from specdec.drafters import DraftModel, PromptLookup
from specdec.drafters.compose import Fallback, Merge
from specdec.trees import LinearCost, TokenTree, merge

DEPTH = 4
FREE = LinearCost(0.0)  # verification priced as free: a Merge keeps every node


def paths(tree: TokenTree) -> list[tuple[int, ...]]:
    return [tuple(tree.tokens[tree.path_to(i)].tolist()) for i in range(len(tree))]


def tree(tokens, parents, scores=None, draft_probs=None) -> TokenTree:
    scores = None if scores is None else torch.tensor(scores, dtype=torch.float64)
    return TokenTree(
        torch.tensor(tokens, dtype=torch.long), torch.tensor(parents, dtype=torch.long), draft_probs, scores
    )


# ---- merge ------------------------------------------------------------------------------


def test_merge_dedupes_shared_prefixes_as_a_trie():
    a = tree([1, 2, 3], [-1, 0, 0])
    b = tree([1, 3, 4, 5], [-1, 0, -1, 2])
    merged, (ia, ib) = merge([a, b], [torch.ones(3), torch.ones(4)], None)
    assert paths(merged) == [(1,), (1, 2), (1, 3), (4,), (4, 5)]
    assert merged.parents.tolist() == [-1, 0, 0, -1, 3]
    assert ia.tolist() == [0, 1, 2] and ib.tolist() == [0, 2, 3, 4]
    assert ia.dtype == torch.long and merged.draft_probs is None


def test_merge_score_is_the_max_clamped_to_the_parent():
    a = tree([1, 2, 3], [-1, 0, 1])
    b = tree([1, 2, 7], [-1, 0, 0])
    scores = [torch.tensor([0.6, 0.5, 0.1], dtype=torch.float64), torch.tensor([0.3, 0.9, 0.4], dtype=torch.float64)]
    merged, _ = merge([a, b], scores, None)
    assert paths(merged) == [(1,), (1, 2), (1, 2, 3), (1, 7)]
    # (1,): max(0.6, 0.3); (1, 2): max(0.5, 0.9) = 0.9 clamped to 0.6; (1, 2, 3): 0.1; (1, 7): 0.4
    assert merged.scores.tolist() == [0.6, 0.6, 0.1, 0.4]
    assert merged.scores.dtype == torch.float64


def test_merge_budget_keeps_the_best_ancestor_closed_nodes():
    a = tree([1, 2, 3], [-1, 0, 1])
    b = tree([5, 6], [-1, 0])
    scores = [torch.tensor([0.5, 0.9, 0.8]), torch.tensor([0.7, 0.2])]  # a's children outrank a's root child
    merged, (ia, ib) = merge([a, b], scores, 2)
    assert paths(merged) == [(1,), (5,)]  # 0.9 and 0.8 were clamped to 0.5, and ties go to the parent
    assert ia.tolist() == [0, -1, -1] and ib.tolist() == [1, -1]
    merged, (ia, ib) = merge([a, b], scores, 3)
    assert paths(merged) == [(1,), (1, 2), (5,)]  # (1, 2) ties with (1, 2, 3) at 0.5 and comes first
    assert ia.tolist() == [0, 1, -1] and ib.tolist() == [2, -1]
    merged, maps = merge([a, b], scores, 0)
    assert len(merged) == 0 and [m.tolist() for m in maps] == [[-1, -1, -1], [-1, -1]]


def test_merge_of_nothing_and_of_empty_trees():
    merged, maps = merge([], [], None)
    assert len(merged) == 0 and maps == []
    empty = TokenTree.empty()
    merged, maps = merge([empty, tree([4], [-1]), empty], [torch.zeros(0), torch.tensor([0.3]), torch.zeros(0)], 5)
    assert paths(merged) == [(4,)]
    assert [m.tolist() for m in maps] == [[], [0], []]
    assert merged.scores.shape == (1,)


def test_merge_single_tree_is_unchanged():
    a = tree([3, 4, 5, 6], [-1, 0, 0, 2])
    merged, (ia,) = merge([a], [torch.tensor([0.9, 0.2, 0.5, 0.4])], None)
    assert torch.equal(merged.tokens, a.tokens) and torch.equal(merged.parents, a.parents)
    assert ia.tolist() == [0, 1, 2, 3]


def test_merge_rejects_bad_arguments():
    a = tree([1], [-1])
    with pytest.raises(ValueError, match="1 trees but 2"):
        merge([a], [torch.ones(1), torch.ones(1)])
    with pytest.raises(ValueError, match="scores\\[0\\]"):
        merge([a], [torch.ones(2)])
    with pytest.raises(ValueError, match="scores\\[0\\] is None"):
        merge([a], [None])
    with pytest.raises(ValueError, match="NaN"):
        merge([a], [torch.tensor([float("nan")])])
    with pytest.raises(ValueError, match="budget"):
        merge([a], [torch.ones(1)], -1)


@st.composite
def scored_trees(draw, max_nodes=8):
    n = draw(st.integers(0, max_nodes))
    parents = [draw(st.integers(-1, i - 1)) for i in range(n)]
    tokens = draw(st.lists(st.integers(0, 3), min_size=n, max_size=n))  # few tokens: many shared paths
    scores = draw(st.lists(st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.75, 1.0]), min_size=n, max_size=n))
    return tree(tokens, parents), torch.tensor(scores, dtype=torch.float64)


@settings(max_examples=80, deadline=None)
@given(st.lists(scored_trees(), min_size=0, max_size=4), st.integers(0, 12))
def test_merge_properties(items, budget):
    trees, scores = [t for t, _ in items], [s for _, s in items]
    full, full_maps = merge(trees, scores, None)
    union = {p for t in trees for p in paths(t)}
    assert len(full) == len(union) and set(paths(full)) == union  # every path once, nothing else
    for t, m in zip(trees, full_maps):
        assert [paths(full)[i] for i in m.tolist()] == paths(t)  # each node maps to its own path
    # Score: the best contributor, clamped to the parent's merged score.
    raw = {p: max(float(s[i]) for t, s in items for i, q in enumerate(paths(t)) if q == p) for p in union}
    for i, p in enumerate(paths(full)):
        parent = int(full.parents[i])
        want = raw[p] if parent < 0 else min(raw[p], float(full.scores[parent]))
        assert float(full.scores[i]) == want

    cut, cut_maps = merge(trees, scores, budget)
    order = sorted(range(len(full)), key=lambda i: (-float(full.scores[i]), i))
    kept = sorted(order[:budget])
    assert paths(cut) == [paths(full)[i] for i in kept]  # the top-`budget` nodes, first-seen order kept
    assert torch.equal(cut.scores, full.scores[kept]) if kept else len(cut) == 0
    assert all(int(full.parents[i]) in kept + [-1] for i in kept)  # ancestor-closed
    new = {old: new for new, old in enumerate(kept)}
    for fm, cm in zip(full_maps, cut_maps):
        assert cm.tolist() == [new.get(m, -1) for m in fm.tolist()]


# ---- scripted drafters ------------------------------------------------------------------


class Recorder:
    """Proposes `make(ctx)`; records (its pending proposal or None, feedback) at every update.
    Given a drafter instead of a function, it spies on it: calls pass through to it."""

    needs_hidden_states = False

    def __init__(self, make, feedback_topk=0):
        self.inner = None if callable(make) else make
        self.make = make if self.inner is None else self.inner.propose
        self.feedback_topk = feedback_topk
        self.pending, self.records, self.begun = None, [], 0

    def begin(self, target):
        self.begun += 1
        if self.inner is not None:
            self.inner.begin(target)

    def propose(self, ctx):
        self.pending = self.make(ctx)
        return self.pending

    def update(self, feedback):
        self.records.append((self.pending, feedback))
        self.pending = None
        if self.inner is not None:
            self.inner.update(feedback)


def depth_of(ctx):
    return DEPTH if ctx.max_depth is None else min(DEPTH, ctx.max_depth)


def scripted(ref, fail_at=DEPTH + 1, shape="chain", junk=(7, 13)):
    """The reference continuation with a wrong token at depth `fail_at` (1-based); "siblings"
    puts junk siblings (offsets `junk`) before the right node at every level."""

    def make(ctx):
        t = ctx.input_ids.numel()
        right = ref[0, t : t + depth_of(ctx)].clone()
        if len(right) >= fail_at:
            right[fail_at - 1] = (right[fail_at - 1] + 1) % VOCAB
        if shape == "chain" or not len(right):
            return TokenTree.chain(right)
        tokens, parents, parent = [], [], -1
        for tok in right.tolist():
            kids = [(tok + j) % VOCAB for j in junk] + [tok]
            tokens += kids
            parents += [parent] * len(kids)
            parent = len(tokens) - 1
        return tree(tokens, parents)

    return make


def junk_chain(ref):
    return lambda ctx: TokenTree.chain((ref[0, ctx.input_ids.numel() :][: depth_of(ctx)] + 1) % VOCAB)


def run(model, prompt, drafter, max_new=30, **kw):
    stats = specdec.GenerationStats()
    out = specdec.generate(model, prompt, drafter, max_new_tokens=max_new, eos_token_id=[], stats=stats, **kw)
    return out, stats


def check_feedback(rec):
    """Invariants of every feedback a recorder inside a Merge got during greedy generation."""
    for proposal, fb in rec.records:
        own = fb.tree
        proposal = TokenTree.empty() if proposal is None else proposal  # feedback on a step it was not asked
        assert len(own) <= len(proposal) and set(paths(own)) <= set(paths(proposal))  # a kept subtree
        acc = fb.accepted_nodes
        assert [int(own.parents[a]) for a in acc] == ([-1] + acc)[: len(acc)]  # a path from the root
        assert own.tokens[acc].tolist() == fb.new_tokens[: len(acc)].tolist()
        tip = acc[-1] if acc else -1
        nxt = int(fb.new_tokens[len(acc)])
        assert all(int(own.tokens[c]) != nxt for c in own.children(tip))  # the longest own path
        if rec.feedback_topk == 0:
            assert fb.target_topk is None
        else:
            assert fb.target_topk.shape == (len(own) + 1, rec.feedback_topk)
            # greedy: the target's top-1 after the root and after each accepted node is what came next
            rows = [0] + [a + 1 for a in acc]
            assert fb.target_topk[rows, 0].tolist() == fb.new_tokens[: len(acc) + 1].tolist()


# ---- Merge ------------------------------------------------------------------------------


def test_merge_feedback_is_each_drafters_own_kept_subtree():
    a = Recorder(lambda ctx: tree([5, 6, 7, 8], [-1, 0, 1, 0]), feedback_topk=2)  # no scores: 0.5 ** depth
    b = Recorder(lambda ctx: tree([5, 6, 9, 3], [-1, 0, 1, -1], scores=[0.9, 0.8, 0.7, 0.05]))
    c = Recorder(lambda ctx: TokenTree.empty(), feedback_topk=3)
    d = Recorder(lambda ctx: tree([70], [-1], scores=[0.01]))  # dropped by the budget
    m = Merge([a, b, c, d], budget=4)
    assert m.feedback_topk == 3 and not m.needs_hidden_states
    m.begin(None)
    assert (a.begun, b.begun, c.begun, d.begun) == (1, 1, 1, 1)
    merged = m.propose(Context(torch.tensor([1, 2, 3]), verify_cost=FREE))
    # merged scores: (5) .9, (5 6) .8, (5 6 7) .125, (5 8) .25, (5 6 9) .7, (3) .05, (70) .01
    assert paths(merged) == [(5,), (5, 6), (5, 8), (5, 6, 9)]
    assert merged.draft_probs is None
    top = torch.arange(5 * 3).reshape(5, 3)  # [n + 1, 3]: row r holds 3r, 3r + 1, 3r + 2
    new = torch.tensor([5, 6, 9, 42])
    m.update(Feedback(merged, [0, 1, 3], new, top))

    (_, fa), (_, fb), (_, fc), (_, fd) = a.records[0], b.records[0], c.records[0], d.records[0]
    assert paths(fa.tree) == [(5,), (5, 6), (5, 8)] and fa.accepted_nodes == [0, 1]
    assert torch.equal(fa.target_topk, top[[0, 1, 2, 3], :2])
    assert paths(fb.tree) == [(5,), (5, 6), (5, 6, 9)] and fb.accepted_nodes == [0, 1, 2]
    assert torch.equal(fb.tree.scores, torch.tensor([0.9, 0.8, 0.7], dtype=torch.float64))  # its own scores
    assert fb.target_topk is None  # it asked for none
    assert len(fc.tree) == 0 and fc.accepted_nodes == [] and torch.equal(fc.target_topk, top[[0]])
    assert len(fd.tree) == 0 and fd.accepted_nodes == [] and fd.target_topk is None
    for f in (fa, fb, fc, fd):
        assert torch.equal(f.new_tokens, new)
    # a: 2 accepted, its path ends without a child there (2 trials); b: 3 of 3; c, d: no evidence
    assert (m.stats[0].hits, m.stats[0].trials) == pytest.approx((0.95 + 2, 1.9 + 2))
    assert (m.stats[1].hits, m.stats[1].trials) == pytest.approx((0.95 + 3, 1.9 + 3))
    assert m.acceptance(2) == m.acceptance(3) == 0.5


def test_merge_maps_duplicate_siblings_to_one_path():
    a = Recorder(lambda ctx: tree([4, 4, 6], [-1, -1, 1]))  # the path (4, 6) goes through the second 4
    m = Merge([a])
    merged = m.propose(Context(torch.tensor([1]), verify_cost=FREE))
    assert paths(merged) == [(4,), (4, 6)]
    m.update(Feedback(merged, [0, 1], torch.tensor([4, 6, 0])))
    fb = a.records[0][1]
    assert fb.accepted_nodes == [1, 2] and len(fb.tree) == 3


def test_merge_counts_a_failed_level_once():
    a = Recorder(lambda ctx: tree([5, 6, 7], [-1, 0, 0]))  # two children under 5: one level of trials
    m = Merge([a])
    merged = m.propose(Context(torch.tensor([1]), verify_cost=FREE))
    m.update(Feedback(merged, [0], torch.tensor([5, 9])))
    assert (m.stats[0].hits, m.stats[0].trials) == pytest.approx((0.95 + 1, 1.9 + 2))


def test_merge_dropped_drafter_drifts_back_to_the_prior():
    a = Recorder(lambda ctx: tree([5], [-1], scores=[1.0]))
    b = Recorder(lambda ctx: tree([6], [-1]))
    m = Merge([a, b], budget=1)
    m.stats[1].hits = 0.1
    rates = []
    for _ in range(30):
        merged = m.propose(Context(torch.tensor([1])))
        assert paths(merged) == [(5,)]
        m.update(Feedback(merged, [0], torch.tensor([5, 0])))
        rates.append(m.acceptance(1))
    assert all(x < y for x, y in zip(rates, rates[1:])) and 0.2 < rates[-1] < 0.5


def test_merge_without_its_proposal_passes_committed_tokens_only():
    a = Recorder(lambda ctx: tree([5], [-1]), feedback_topk=1)
    m = Merge([a, Recorder(lambda ctx: TokenTree.empty())])
    m.update(Feedback(TokenTree.empty(), [], torch.tensor([3]), torch.tensor([[3, 4]])))  # the loop skipped drafting
    merged = m.propose(Context(torch.tensor([1])))
    other = tree([9, 8], [-1, 0])  # not what it proposed: nothing to map
    m.update(Feedback(other, [0], torch.tensor([9, 2]), torch.tensor([[9, 1], [2, 0], [5, 6]])))
    for pending, fb in a.records:
        assert len(fb.tree) == 0 and fb.accepted_nodes == [] and fb.target_topk.shape == (1, 1)
    assert a.records[0][1].new_tokens.tolist() == [3] and a.records[1][1].new_tokens.tolist() == [9, 2]
    assert m.acceptance(0) == 0.5 and len(merged) == 1


def test_merge_respects_max_depth_for_parts_that_do_not():
    deep = Recorder(lambda ctx: TokenTree.chain(torch.arange(6)))
    merged = Merge([deep]).propose(Context(torch.tensor([1]), max_depth=2, verify_cost=FREE))
    assert paths(merged) == [(0,), (0, 1)]


def test_merge_sizes_the_union_by_the_verify_cost():
    """The union is cut to the n >= 1 best nodes that pay for their verify time."""
    a = Recorder(lambda ctx: tree([5, 6, 7], [-1, 0, 1], scores=[0.9, 0.6, 0.2]))
    b = Recorder(lambda ctx: tree([8], [-1], scores=[0.1]))
    propose = lambda cost: paths(Merge([a, b]).propose(Context(torch.tensor([1]), verify_cost=cost)))  # noqa: E731
    assert propose(FREE) == [(5,), (5, 6), (5, 6, 7), (8,)]
    # 1 + 0.3 n: 0.9 and 0.6 pay for it, 0.2 and 0.1 do not
    assert propose(LinearCost(0.3)) == [(5,), (5, 6)]
    assert propose(LinearCost(100.0)) == [(5,)]  # never nothing: the parts already chose to draft


def test_merge_drops_draft_probs_and_validates():
    q = torch.softmax(torch.randn(2, VOCAB), -1)
    m = Merge([Recorder(lambda ctx: tree([1, 2], [-1, 0], draft_probs=q)), Recorder(lambda ctx: tree([3], [-1]))])
    assert m.propose(Context(torch.tensor([0]))).draft_probs is None
    r = Recorder(lambda ctx: TokenTree.empty())
    with pytest.raises(ValueError, match="drafters is empty"):
        Merge([])
    with pytest.raises(ValueError, match="budget"):
        Merge([r], budget=0)
    with pytest.raises(ValueError, match="decay"):
        Merge([r], decay=0.0)
    with pytest.raises(ValueError, match="same drafter object"):
        Merge([r, r])
    with pytest.raises(TypeError, match="not a drafter"):
        Merge([r, object()])
    hidden = Recorder(lambda ctx: TokenTree.empty(), feedback_topk=4)
    hidden.needs_hidden_states = True
    assert Merge([r, hidden]).needs_hidden_states and Merge([r, hidden]).feedback_topk == 4


def test_merged_one_hot_proposals_sample_exactly_p():
    """Speculative over a merged tree (draft_probs dropped) emits the first token with law p."""
    vocab = 6
    p = torch.softmax(torch.tensor([1.0, 0.2, 1.5, -0.5, 0.7, 0.0], dtype=torch.float64), -1)
    sampled = tree([1, 2], [-1, -1], draft_probs=torch.softmax(torch.randn(2, vocab), -1))  # as if drawn from q
    merged, _ = merge([sampled, tree([2, 4], [-1, -1])], [torch.ones(2), torch.ones(2)], None)
    assert paths(merged) == [(1,), (2,), (4,)] and merged.draft_probs is None
    logits = torch.log(p)[None].repeat(len(merged) + 1, 1)  # [n + 1, vocab]
    rule, n = Speculative(seed=0), 20000
    counts = torch.zeros(vocab)
    for _ in range(n):
        d = rule(merged, logits)
        counts[int(merged.tokens[d.accepted_nodes[0]]) if d.accepted_nodes else d.next_token] += 1
    sigma = (p * (1 - p) / n).sqrt()
    assert bool(((counts / n - p).abs() < 4 * sigma + 1e-3).all()), (counts / n, p)


def test_merge_learns_to_prefer_the_oracle_under_a_small_budget(free_verify):
    model = tiny_model()
    prompt = random_prompt(5, 7)
    ref = reference(model, prompt, 30 + DEPTH)
    junk, oracle = Recorder(junk_chain(ref)), Recorder(scripted(ref))
    m = Merge([junk, oracle], budget=DEPTH)
    out, stats = run(model, prompt, m, guard=None)
    assert torch.equal(out, ref[:, : prompt.shape[1] + 30])
    # At the 0.5 prior the two tie and the junk drafter (listed first) takes half the budget.
    assert len(stats.steps[0].accepted_nodes) == 2 and len(junk.records[0][1].tree) == 2
    assert all(len(s.accepted_nodes) == DEPTH for s in stats.steps[2:-1])
    # proposed, but dropped by the budget (on the last step the oracle's short tree leaves room)
    assert all(len(fb.tree) == 0 for _, fb in junk.records[2:-1])
    assert m.acceptance(0) < 0.3 and m.acceptance(1) > 0.9


@pytest.mark.parametrize("arch", ["llama", "qwen"])
@pytest.mark.parametrize("budget", [None, 3])
def test_merge_of_scripted_drafters_is_exact(arch, budget, free_verify):
    model = tiny_model(arch)
    prompt = random_prompt(3, 7)
    ref = reference(model, prompt, 30 + DEPTH)
    recs = [
        Recorder(scripted(ref, 2, "siblings"), feedback_topk=2),
        Recorder(scripted(ref, 4, "chain")),
        Recorder(scripted(ref, 3, "siblings", junk=(7, 21)), feedback_topk=1),
    ]
    out, stats = run(model, prompt, Merge(recs, budget=budget), guard=None)
    assert torch.equal(out, ref[:, : prompt.shape[1] + 30])
    if budget is None:  # the union holds the chain that fails at depth 4: 3 drafts per step
        assert all(len(s.accepted_nodes) == 3 for s in stats.steps[:-1])
    for rec in recs:
        assert len(stats.steps) - 1 <= len(rec.records) <= len(stats.steps)  # one update per step (maybe not the last)
        check_feedback(rec)


@pytest.mark.parametrize("arch", ["llama", "qwen"])
def test_merge_and_fallback_of_real_drafters_are_exact(arch):
    model = tiny_model(arch)
    small = lambda seed: tiny_model(arch, seed=seed, layers=1)  # noqa: E731
    spied = []

    def spy(drafter, feedback_topk=0):
        spied.append(Recorder(drafter, feedback_topk))
        return spied[-1]

    makes = [
        lambda: Merge([spy(PromptLookup(), 2), spy(DraftModel(model, num_tokens=3, sized=False))]),  # self
        lambda: Merge([spy(PromptLookup(num_matches=2)), spy(DraftModel(small(1), topk=2, num_tokens=3), 1)], budget=5),
        lambda: Fallback(PromptLookup(), DraftModel(small(1))),
        lambda: Fallback(Merge([PromptLookup(num_matches=2), DraftModel(small(1))], budget=4), DraftModel(small(2))),
        lambda: Merge([Fallback(PromptLookup(), DraftModel(small(1))), DraftModel(small(2), topk=2, num_tokens=2)]),
    ]
    for seed in range(2):
        base = random_prompt(seed, 8)
        prompt = torch.cat([base, base[:, :5], base], dim=1)  # repetition for prompt lookup to find
        ref = reference(model, prompt, 30)
        for make in makes:
            out, stats = run(model, prompt, make(), guard=None)
            assert torch.equal(out, ref), make
            assert stats.new_tokens == 30
    assert len(spied) == 8 and all(rec.records for rec in spied)
    for rec in spied:
        check_feedback(rec)
    assert any(fb.accepted_nodes for rec in spied[::2] for _, fb in rec.records)  # prompt lookup was accepted
    assert any(fb.accepted_nodes for rec in spied[1::2] for _, fb in rec.records)  # and so was the draft model


# ---- Fallback ---------------------------------------------------------------------------


def test_fallback_feedback_goes_to_the_drafter_that_proposed():
    model = tiny_model("qwen")
    prompt = random_prompt(2, 6)
    ref = reference(model, prompt, 30 + DEPTH)
    oracle = scripted(ref)
    primary = Recorder(
        lambda ctx: oracle(ctx) if ctx.input_ids.numel() % 3 == 0 else TokenTree.empty(), feedback_topk=2
    )
    secondary = Recorder(scripted(ref, 2, "siblings"))
    fallback = Fallback(primary, secondary)
    assert fallback.feedback_topk == 2 and not fallback.needs_hidden_states
    out, stats = run(model, prompt, fallback, guard=None)
    assert torch.equal(out, ref[:, : prompt.shape[1] + 30])
    assert primary.begun == secondary.begun == 1
    assert len(primary.records) == len(secondary.records) >= len(stats.steps) - 1
    used = set()
    for step, (p_tree, p_fb), (s_tree, s_fb) in zip(stats.steps, primary.records, secondary.records):
        proposer, (tree_, fb), (other_tree, other_fb) = (
            ("primary", (p_tree, p_fb), (s_tree, s_fb)) if p_tree is not None and len(p_tree) else
            ("secondary", (s_tree, s_fb), (p_tree, p_fb))
        )
        used.add(proposer)
        assert fb.tree is tree_ is step.tree and fb.accepted_nodes == step.accepted_nodes
        assert fb.new_tokens.tolist() == step.new_tokens == other_fb.new_tokens.tolist()
        assert len(other_fb.tree) == 0 and other_fb.accepted_nodes == []
        assert other_tree is None or len(other_tree) == 0  # the secondary is asked only when needed
        top = p_fb.target_topk  # the primary asked for 2 columns, the secondary for none
        assert s_fb.target_topk is None
        assert top.shape == ((len(step.tree) + 1 if proposer == "primary" else 1), 2)
        assert int(top[0, 0]) == step.new_tokens[0]
        if proposer == "primary":
            assert len(step.accepted_nodes) == min(DEPTH, len(step.tree))  # the oracle
        else:
            assert len(step.accepted_nodes) == 1  # fails at depth 2
    assert used == {"primary", "secondary"}


def test_fallback_without_its_proposal_and_validation():
    a = Recorder(lambda ctx: TokenTree.empty(), feedback_topk=1)
    b = Recorder(lambda ctx: tree([3], [-1]))
    f = Fallback(a, b)
    f.update(Feedback(TokenTree.empty(), [], torch.tensor([4]), torch.tensor([[4]])))  # the loop skipped drafting
    assert all(len(fb.tree) == 0 and fb.new_tokens.tolist() == [4] for _, fb in a.records + b.records)
    assert a.records[0][1].target_topk.tolist() == [[4]] and b.records[0][1].target_topk is None
    assert paths(f.propose(Context(torch.tensor([1])))) == [(3,)]
    with pytest.raises(ValueError, match="same object"):
        Fallback(a, a)
    with pytest.raises(TypeError, match="secondary"):
        Fallback(a, "prompt-lookup")
