"""The spec: speculative greedy == `model.generate` greedy, token for token.

Grid: tree shapes {chain, static tree, tree with siblings} x {eager, sdpa} x scripted drafters
that fail at depth j for every j (j = depth: all accepted, the oracle) + random drafters +
the real drafters, on Llama and Qwen2 (GQA, float64), on every device of the `device` fixture
(prompts, reference and output live on the model's device, as a caller's would).
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import specdec
from conftest import VOCAB, random_prompt, reference, tiny_model
from specdec.drafters import DraftModel, PromptLookup
from specdec.trees import TokenTree

MAX_NEW = 24
DEPTH = 4


class Scripted:
    """Proposes the reference continuation with a wrong token at depth `fail_at` (1-based; beyond
    DEPTH = never), shaped as `shape`: a chain, a static tree (the right branch first, junk
    siblings), or a tree where the right branch is always the last sibling."""

    needs_hidden_states = False

    def __init__(self, ref, fail_at, shape):
        self.ref, self.fail_at, self.shape = ref[0], fail_at, shape

    def begin(self, target):
        pass

    def propose(self, ctx):
        t = ctx.input_ids.numel()
        right = self.ref[t : t + DEPTH].clone()
        if len(right) >= self.fail_at:
            right[self.fail_at - 1] = (right[self.fail_at - 1] + 1) % VOCAB
        if self.shape == "chain" or not len(right):
            return TokenTree.chain(right)
        tokens, parents, parent = [], [], -1
        for tok in right.tolist():
            junk = [(tok + 7) % VOCAB, (tok + 13) % VOCAB]
            kids = [tok] + junk if self.shape == "static" else junk + [tok]
            first = len(tokens)
            tokens += kids
            parents += [parent] * len(kids)
            parent = first if self.shape == "static" else first + len(kids) - 1
        return TokenTree(torch.tensor(tokens), torch.tensor(parents))

    def update(self, feedback):
        pass


class RandomTree:
    needs_hidden_states = False

    def __init__(self, seed, n=6):
        self.g, self.n = torch.Generator().manual_seed(seed), n

    def begin(self, target):
        pass

    def propose(self, ctx):
        parents = [int(torch.randint(-1, i, (1,), generator=self.g)) for i in range(self.n)]
        return TokenTree(torch.randint(0, VOCAB, (self.n,), generator=self.g), torch.tensor(parents))

    def update(self, feedback):
        pass


def run(model, prompt, drafter, max_new=MAX_NEW, **kw):
    kw.setdefault("guard", None)  # every step drafts, so the per-step assertions see every depth
    stats = specdec.GenerationStats()
    out = specdec.generate(model, prompt, drafter, max_new_tokens=max_new, eos_token_id=[], stats=stats, **kw)
    return out, stats


@pytest.mark.parametrize("arch", ["llama", "qwen"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("shape", ["chain", "static", "siblings"])
def test_scripted_failure_at_every_depth(arch, attn, shape, device):
    model = tiny_model(arch, attn=attn, device=device)
    prompt = random_prompt(3, 7).to(device)
    ref = reference(model, prompt, MAX_NEW + DEPTH)
    for fail_at in range(1, DEPTH + 2):  # DEPTH + 1: never fails (the oracle)
        out, stats = run(model, prompt, Scripted(ref, fail_at, shape))
        assert torch.equal(out, ref[:, : prompt.shape[1] + MAX_NEW]), (shape, fail_at)
        # A failure at depth j accepts exactly j - 1 drafts per step (the last step may be cut).
        assert all(len(s.accepted_nodes) == min(fail_at - 1, DEPTH) for s in stats.steps[:-1])


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_random_trees(attn, device):
    model = tiny_model("llama", attn=attn, device=device)
    for seed in range(4):
        prompt = random_prompt(seed, 5).to(device)
        ref = reference(model, prompt, MAX_NEW)
        assert torch.equal(run(model, prompt, RandomTree(seed))[0], ref)


@settings(max_examples=15, deadline=None)
@given(
    prompt=st.lists(st.integers(0, VOCAB - 2), min_size=1, max_size=12),
    parents=st.lists(st.integers(-1, 8), min_size=0, max_size=9),
    seed=st.integers(0, 3),
)
def test_hypothesis_prompts_and_tree_shapes(prompt, parents, seed, device):
    parents = [min(p, i - 1) for i, p in enumerate(parents)]
    model = tiny_model("llama", seed=seed, device=device)
    prompt = torch.tensor([prompt], device=device)
    ref = reference(model, prompt, 12)
    ref_host = ref.cpu()  # the drafter below builds its trees on the host

    class Shaped(RandomTree):  # reference tokens along each node's depth, so some paths hit
        def propose(self, ctx):
            t = ctx.input_ids.numel()
            tree = TokenTree(torch.zeros(len(parents), dtype=torch.long), torch.tensor(parents, dtype=torch.long))
            depth = tree.depths()
            follow = ref_host[0, t - 1 + depth.clamp(max=ref.shape[1] - t)] if len(parents) else depth
            noise = torch.randint(0, 2, (len(parents),), generator=self.g)
            return TokenTree((follow + noise) % VOCAB, tree.parents)

    assert torch.equal(run(model, prompt, Shaped(seed), max_new=12)[0], ref)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize(
    "make",
    [
        lambda d: PromptLookup(),
        lambda d: PromptLookup(num_tokens=4, max_ngram=2, num_matches=3),
        lambda d: DraftModel(tiny_model("llama", seed=1, layers=1, device=d)),
        lambda d: DraftModel(tiny_model("llama", seed=1, layers=1, device=d), topk=3, num_tokens=3, budget=7),
        lambda d: DraftModel(tiny_model("llama", device=d), num_tokens=3, sized=False),  # self-drafting
        lambda d: DraftModel(tiny_model("llama", device=d), topk=2, width=8, num_tokens=3, sized=False),
    ],
    ids=["lookup-chain", "lookup-tree", "draft-chain", "draft-tree", "self-chain", "self-tree"],
)
def test_real_drafters(make, attn, device):
    model = tiny_model("llama", attn=attn, device=device)
    for seed in range(3):
        base = random_prompt(seed, 8)
        prompt = torch.cat([base, base[:, :5], base], dim=1).to(device)  # repetition for prompt lookup to find
        ref = reference(model, prompt, 40)
        out, stats = run(model, prompt, make(device), max_new=40)
        assert torch.equal(out, ref)
        assert stats.new_tokens == 40


def test_self_drafting_accepts_everything(device):
    model = tiny_model("llama", device=device)
    prompt = random_prompt(0, 6).to(device)
    _, stats = run(model, prompt, DraftModel(model, num_tokens=4, sized=False), max_new=25)
    assert stats.mean_accepted == 5.0 and stats.target_forwards == 5


def test_draft_model_on_qwen_target(device):
    model, draft = tiny_model("qwen", device=device), tiny_model("qwen", seed=4, device=device)
    prompt = random_prompt(1, 9).to(device)
    ref = reference(model, prompt, 30)
    assert torch.equal(run(model, prompt, DraftModel(draft, topk=2, num_tokens=3), max_new=30)[0], ref)
