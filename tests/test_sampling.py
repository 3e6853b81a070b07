"""Lossless sampling: `Speculative` must give exactly the target's sampling distribution.

Without a model: a Markov target p(. | last token) and a different draft q over a small
vocabulary; the joint distribution of the first two committed tokens is compared with the exact
one in total variation. With the tiny model: the same through `specdec.generate` with logits
processors, against the distribution enumerated from the model itself.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper

import specdec
from conftest import random_prompt, tiny_model
from specdec.acceptance import Greedy, Speculative, Typical
from specdec.trees import TokenTree

V = 6
TRIALS = 20_000
TOLERANCE = 0.03


def tables(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """[V, V] p(next | last) and a different q(next | last), both peaked unevenly."""
    g = torch.Generator().manual_seed(seed)
    p, q = (torch.softmax(2.0 * torch.randn(V, V, generator=g, dtype=torch.float64), -1) for _ in range(2))
    return p, q


P, Q = tables()


def top_k(p: torch.Tensor, k: int) -> torch.Tensor:
    """What TopKLogitsWarper does to a distribution."""
    keep = torch.zeros_like(p)
    idx = p.topk(k, dim=-1).indices
    keep.scatter_(-1, idx, 1.0)
    out = p * keep
    return out / out.sum(-1, keepdim=True)


def sample(dist: torch.Tensor, gen: torch.Generator, n: int = 1) -> list[int]:
    return torch.multinomial(dist, n, replacement=True, generator=gen).tolist()


def deterministic_chain(gen):
    a = int(Q[0].argmax())
    return TokenTree.chain([a, int(Q[a].argmax())])


def sampled_chain(gen):
    a = sample(Q[0], gen)[0]
    b = sample(Q[a], gen)[0]
    return TokenTree.chain([a, b], draft_probs=torch.stack([Q[0], Q[a]]))


def sampled_siblings(gen):
    """Two i.i.d. children of the root, each with one sampled child."""
    a1, a2 = sample(Q[0], gen, 2)
    b1, b2 = sample(Q[a1], gen)[0], sample(Q[a2], gen)[0]
    return TokenTree(
        torch.tensor([a1, a2, b1, b2]), torch.tensor([-1, -1, 0, 1]), torch.stack([Q[0], Q[0], Q[a1], Q[a2]])
    )


def top_k_siblings(gen):
    """Deterministic siblings (the draft's top 3, EAGLE-style): one-hot q, tried in order."""
    first = Q[0].topk(3).indices.tolist()
    tokens, parents = list(first), [-1, -1, -1]
    for i, a in enumerate(first):
        tokens.append(int(Q[a].argmax()))
        parents.append(i)
    return TokenTree(torch.tensor(tokens), torch.tensor(parents))


def first_two(tree_of, target: torch.Tensor, seed: int) -> Counter:
    """Counts of the first two committed tokens after root token 0 over TRIALS speculative steps."""
    rule, gen = Speculative(seed=seed), torch.Generator().manual_seed(seed + 1)
    counts: Counter = Counter()
    for _ in range(TRIALS):
        tree = tree_of(gen)
        rows = torch.cat([target[:1], target[tree.tokens]])  # row 0: the root's (token 0), row i + 1: node i's
        decision = rule(tree, rows.log())
        new = tree.tokens[decision.accepted_nodes].tolist() + [decision.next_token]
        if len(new) == 1:  # the next plain step samples the second token from the target
            new.append(sample(target[new[0]], gen)[0])
        counts[tuple(new[:2])] += 1
    return counts


def total_variation(counts: Counter, target: torch.Tensor) -> float:
    exact = target[0][:, None] * target  # [V, V]: p(a | 0) p(b | a)
    return 0.5 * sum(abs(counts[(a, b)] / TRIALS - float(exact[a, b])) for a in range(V) for b in range(V))


@pytest.mark.parametrize(
    "tree_of", [deterministic_chain, sampled_chain, sampled_siblings, top_k_siblings, lambda g: TokenTree.empty()]
)
@pytest.mark.parametrize("k", [None, 3])
def test_speculative_sampling_matches_the_target_distribution(tree_of, k):
    target = P if k is None else top_k(P, k)  # top-k: drafts outside the support must always be rejected
    counts = first_two(tree_of, target, seed=11)
    assert total_variation(counts, target) < TOLERANCE


@pytest.mark.parametrize("tree_of", [deterministic_chain, sampled_chain, top_k_siblings, lambda g: TokenTree.empty()])
def test_seeded_coupled_sampling_matches_the_target_distribution(tree_of):
    """With a seed and a position (as generate calls it) each token is a Gumbel-max draw fixed by
    (seed, position); over many positions the first two tokens follow p exactly."""
    target = top_k(P, 4)
    rule, gen = Speculative(seed=11), torch.Generator().manual_seed(12)
    counts: Counter = Counter()
    for trial in range(TRIALS):
        tree = tree_of(gen)
        rows = torch.cat([target[:1], target[tree.tokens]])
        decision = rule(tree, rows.log(), position=2 * trial)
        new = tree.tokens[decision.accepted_nodes].tolist() + [decision.next_token]
        if len(new) == 1:  # the next step's root row predicts position 2 * trial + 1
            new.append(rule(TokenTree.empty(), target[new[0]][None].log(), position=2 * trial + 1).next_token)
        counts[tuple(new[:2])] += 1
    assert total_variation(counts, target) < TOLERANCE


def test_rejections_really_happen():
    """The synthetic draft differs from the target enough that the test above is not vacuous."""
    rule = Speculative(seed=3)
    gen = torch.Generator().manual_seed(4)
    lengths = Counter(
        len(rule(tree := sampled_chain(gen), torch.cat([P[:1], P[tree.tokens]]).log()).accepted_nodes)
        for _ in range(2000)
    )
    assert lengths[0] > 100 and lengths[1] > 20 and lengths[2] > 20


def test_same_seed_same_decisions():
    tree = top_k_siblings(None)
    logits = torch.cat([P[:1], P[tree.tokens]]).log()
    runs = []
    for _ in range(2):
        rule = Speculative(seed=5)
        runs.append([rule(tree, logits) for _ in range(50)])
    assert runs[0] == runs[1]
    assert len({(tuple(d.accepted_nodes), d.next_token) for d in runs[0]}) > 1  # it does sample


def test_zero_draft_probability_is_refused():
    tree = TokenTree.chain([2], draft_probs=torch.zeros(1, V, dtype=torch.float64))
    with pytest.raises(ValueError, match="draft_probs"):
        Speculative(seed=0)(tree, torch.cat([P[:1], P[:1]]).log())


class TargetTopTree:
    """Drafts the target's own two most likely first tokens, each with its most likely follower
    (deterministic siblings), so that acceptances and rejections both occur."""

    needs_hidden_states = False

    def __init__(self, tokens: list[int], parents: list[int]):
        self.tree = TokenTree(torch.tensor(tokens), torch.tensor(parents))

    def begin(self, target) -> None:
        pass

    def propose(self, ctx):
        return self.tree

    def update(self, feedback) -> None:
        pass


@pytest.mark.slow
@pytest.mark.parametrize("coupled", [False, True])
def test_sampled_generate_matches_the_model_distribution(coupled):
    """Through generate (every step drafts): rejection sampling from torch's RNG, and the seeded
    coupling (a fresh seed per run, as a user asking for independent samples would pass)."""
    model = tiny_model("llama", seed=2)
    prompt = random_prompt(9, 12)
    processors = LogitsProcessorList([TemperatureLogitsWarper(0.02), TopKLogitsWarper(3)])

    def dist(ids):
        logits = model(input_ids=ids).logits[:, -1].float()
        return torch.softmax(processors(ids, logits), -1)[0].double()  # [vocab]

    with torch.no_grad():
        p1 = dist(prompt)
        support = p1.nonzero().flatten().tolist()
        exact = {}
        p2 = {}
        for a in support:
            p2[a] = dist(torch.cat([prompt, torch.tensor([[a]])], 1))
            for b in p2[a].nonzero().flatten().tolist():
                exact[(a, b)] = float(p1[a] * p2[a][b])
    first = p1.topk(2).indices.tolist()
    drafter = TargetTopTree(first + [int(p2[a].argmax()) for a in first], [-1, -1, 0, 1])
    trials, counts = 3000, Counter()
    torch.manual_seed(0)
    for trial in range(trials):
        rule = Speculative(seed=trial) if coupled else Speculative()
        out = specdec.generate(
            model, prompt, drafter, max_new_tokens=2, logits_processor=processors, rule=rule, guard=None
        )
        counts[tuple(out[0, -2:].tolist())] += 1
    keys = set(exact) | set(counts)
    tv = 0.5 * sum(abs(counts[k] / trials - exact.get(k, 0.0)) for k in keys)
    assert tv < TOLERANCE, (tv, counts, exact)


def test_greedy_rule_is_still_the_default():
    model = tiny_model()
    prompt = random_prompt(1, 10)
    assert torch.equal(
        specdec.generate(model, prompt, max_new_tokens=4),
        specdec.generate(model, prompt, max_new_tokens=4, rule=Greedy()),
    )


def test_typical_acceptance_takes_plausible_drafts_and_is_greedy_on_one_hot():
    p = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    tree = TokenTree(torch.tensor([3, 1, 2]), torch.tensor([-1, -1, 1]))  # children of root: 3 (p .05), 1 (p .3)
    logits = torch.stack([p, p, p, p]).log()
    decision = Typical(epsilon=0.09, delta=0.3, seed=0)(tree, logits)
    assert decision.accepted_nodes[:1] == [1]  # 1 passes the 0.09 bar, 3 does not; then node 2 (p .15) passes too
    assert decision.accepted_nodes == [1, 2]
    one_hot = torch.full((4, 4), -torch.inf, dtype=torch.float64)
    one_hot[:, 0] = 0.0  # every row: token 0 for sure
    assert Typical(seed=0)(tree, one_hot) == Greedy()(tree, one_hot)
    with pytest.raises(ValueError, match="epsilon"):
        Typical(epsilon=0)
