"""Medusa heads: exactness, the head/depth alignment (oracle heads), checkpoints, tree presets."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import specdec
from conftest import assert_drafts_within, random_prompt, reference, run, tiny_model
from helpers import (
    K,
    assert_drafts_from_the_second_step,
    assert_refuses_other_targets,
    assert_same_drafts,
    named_model,
    random_heads,
)
from specdec.drafter import Context
from specdec.drafters import checkpoint
from specdec.drafters.checkpoint import CheckpointError
from specdec.drafters.medusa import Medusa, MedusaHeads
from specdec.training.data import Batch, target_states
from specdec.training.medusa import MedusaArguments, MedusaRecipe
from specdec.training.train import TrainArguments
from specdec.trees import optimal_shape, parents_of
from specdec.trees.presets import MEDUSA_63, PRESETS, calibrated, cut

ACCURACY = [[0.5, 0.2, 0.1], [0.4, 0.2, 0.1], [0.3, 0.2, 0.1]]


@pytest.mark.parametrize("arch", ["llama", "qwen"])
@pytest.mark.parametrize(
    "tree", [None, "medusa-63", "chain-3", [(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0)], "calibrated"]
)
def test_random_heads_are_exact(arch, tree, device):
    model = tiny_model(arch, device=device)
    kwargs = {"accuracy": ACCURACY} if tree == "calibrated" else {"tree": tree}
    for seed in range(2):
        prompt = random_prompt(seed, 6).to(device)
        ref = reference(model, prompt, 30)
        out, stats = run(model, prompt, Medusa(model, random_heads(model, seed, own=seed == 1), **kwargs), 30)
        assert torch.equal(out, ref)
        assert all(len(s.tree) > 0 for s in stats.steps[:-1])  # every step drafted


class OracleHeads(MedusaHeads):
    """Looks a hidden state up among the reference sequence's states and answers, for head k,
    the reference token 1 + k positions after it: right iff the alignment is right."""

    def __init__(self, model, ref: torch.Tensor, num_heads: int):
        super().__init__(model.config.hidden_size, num_heads)
        self.ref = ref[0]
        self.states = target_states(model, Batch(ref, torch.ones_like(ref), torch.ones_like(ref).bool()))[0]
        self.vocab = model.config.vocab_size

    def forward(self, hidden, lm_weight=None, lm_bias=None, num_heads=None, vocab=None):
        n = self.num_heads if num_heads is None else num_heads
        dist = (self.states[None] - hidden[:, None]).norm(dim=-1)  # [m, L]
        assert float(dist.min(-1).values.max()) < 1e-6, "a hidden state that is no reference position"
        # With a draft vocabulary the logits are over its columns; a token outside it gets none.
        columns = {t: t for t in range(self.vocab)} if vocab is None or vocab.tokens is None else \
            {int(t): j for j, t in enumerate(vocab.tokens)}
        logits = torch.zeros(hidden.shape[0], n, len(columns), dtype=torch.float64)
        for row, p in enumerate(dist.argmin(-1).tolist()):
            for k in range(1, n + 1):
                if int(self.ref[p + 1 + k]) in columns:
                    logits[row, k - 1, columns[int(self.ref[p + 1 + k])]] = 10.0
        return logits


@pytest.mark.parametrize("arch", ["llama", "qwen"])
@pytest.mark.parametrize("prompt_len", [2, 7])
def test_oracle_heads_accept_every_depth(arch, prompt_len):
    """From the first step on (whose states come from the prefill) head k's token is accepted at
    depth k; an off-by-one alignment would accept nothing."""
    model = tiny_model(arch)
    prompt = random_prompt(11, prompt_len)
    ref = reference(model, prompt, 40 + K + 2)
    drafter = Medusa(model, OracleHeads(model, ref, K), tree="chain-3")
    out, stats = run(model, prompt, drafter, 40)
    assert torch.equal(out, ref[:, : prompt_len + 40])
    assert all(len(s.accepted_nodes) == K for s in stats.steps[:-1])
    assert stats.mean_accepted > K


def test_draft_vocabulary_admits_the_contexts_tokens():
    """The draft vocabulary holds only the continuation's tokens that the prompt lacks: oracle heads
    get every depth accepted only if the context's tokens are admitted as they appear."""
    model = tiny_model("llama")
    for seed in range(20):  # the test needs an answer that reuses prompt tokens
        prompt = random_prompt(seed, 7)
        ref = reference(model, prompt, 40 + K + 2)
        continuation = set(ref[0, 7:].tolist())
        if continuation & set(prompt[0].tolist()):
            break
    assert continuation & set(prompt[0].tolist())
    small = torch.tensor(sorted(continuation - set(prompt[0].tolist())))
    drafter = Medusa(model, OracleHeads(model, ref, K), tree="chain-3", draft_vocab=small)
    out, stats = run(model, prompt, drafter, 40)
    assert torch.equal(out, ref[:, :47])
    assert all(len(s.accepted_nodes) == K for s in stats.steps[:-1])


def test_draft_vocabulary_drafts_from_it_and_the_context_and_round_trips(tmp_path):
    model = tiny_model("qwen")
    vocab_size = model.config.vocab_size
    small = torch.tensor([3, 9, 1, 30, 17, 9])  # unsorted, with a repeat: kept sorted and unique
    drafter = Medusa(model, random_heads(model, 0), tree="medusa-63", draft_vocab=small)
    assert drafter.draft_vocab.tolist() == [1, 3, 9, 17, 30]
    assert_drafts_within(model, drafter, small)  # three requests: each from small and its own context
    # The whole vocabulary as the draft vocabulary drafts what no draft vocabulary drafts.
    everything = Medusa(model, random_heads(model, 5), draft_vocab=torch.arange(vocab_size))
    assert_same_drafts(model, Medusa(model, random_heads(model, 5)), everything)
    everything.save_pretrained(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "drafter_config.json").read_text())["config"]["draft_vocab_size"] == vocab_size
    assert torch.equal(Medusa.from_pretrained(tmp_path / "m", model).draft_vocab, torch.arange(vocab_size))
    assert Medusa.from_pretrained(tmp_path / "m", model, draft_vocab=None).draft_vocab is None
    weights = tmp_path / "m" / "drafter.safetensors"
    tensors = load_file(str(weights))
    tensors["draft_vocab"] = torch.arange(5)
    save_file(tensors, str(weights))
    with pytest.raises(CheckpointError, match="corrupt.*draft_vocab_size=96"):
        Medusa.from_pretrained(tmp_path / "m", model)
    # Fewer columns than the tree's ranks (medusa-63 reaches rank 9): the paths beyond are dropped.
    tiny = Medusa(model, random_heads(model, 1), tree="medusa-63", draft_vocab=torch.tensor([1, 2]))
    prompt = torch.tensor([[1, 2, 1, 2, 1, 2]])
    out, stats = run(model, prompt, tiny, 12)
    assert torch.equal(out, reference(model, prompt, 12))
    assert len(stats.steps[0].tree) == len([p for p in cut(MEDUSA_63, K) if max(p) < 2])
    assert set(stats.steps[0].tree.tokens.tolist()) <= {1, 2}
    with pytest.raises(ValueError, match="own their lm_heads"):
        Medusa(model, random_heads(model, 0, own=True), draft_vocab=small)
    with pytest.raises(ValueError, match="Medusa: draft_vocab holds ids outside"):
        Medusa(model, random_heads(model, 0), draft_vocab=torch.tensor([vocab_size]))


def test_one_token_prompt_drafts_nothing_first():
    model = tiny_model("llama")
    assert_drafts_from_the_second_step(model, Medusa(model, random_heads(model, 0)))


def test_session_turns_keep_the_alignment():
    """A later turn prefills only the new tokens; the last state is still the one before the root."""
    model = tiny_model("qwen")
    first = random_prompt(6, 5)
    ref1 = reference(model, first, 12)
    second = torch.cat([ref1, random_prompt(7, 4)], dim=1)
    ref2 = reference(model, second, 12 + K + 2)
    session = specdec.Session(model, Medusa(model, OracleHeads(model, ref2, K), tree="chain-3"), guard=None,
                              eos_token_id=[])
    session.generate(first, max_new_tokens=1)  # one plain step: the oracle only knows ref2's prefix states
    stats = specdec.GenerationStats()
    out = session.generate(second, max_new_tokens=12, stats=stats)
    assert torch.equal(out, ref2[:, : second.shape[1] + 12])
    assert all(len(s.accepted_nodes) == K for s in stats.steps[:-1])


def test_heads_trained_on_own_output_get_accepted():
    """Training alignment == inference alignment: heads fitted with the training loss on the
    model's own greedy continuation are accepted when the model generates it again."""
    model = tiny_model("llama")
    prompt = random_prompt(5, 8)
    ref = reference(model, prompt, 60)
    answer = torch.arange(ref.shape[1])[None] >= prompt.shape[1]
    batch = Batch(ref, torch.ones_like(ref), answer)
    batch.hidden_states = target_states(model, batch)
    recipe = MedusaRecipe(MedusaArguments(num_heads=K))
    heads = recipe.build(model, TrainArguments()).double()
    opt = torch.optim.Adam(heads.parameters(), lr=3e-2)
    for _ in range(150):
        loss, _ = recipe.loss(heads, model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    _, untrained = run(
        model, prompt, Medusa(model, recipe.build(model, TrainArguments()).double(), tree="medusa-16"), 50
    )
    out, stats = run(model, prompt, Medusa(model, heads, tree="medusa-16"), 50)
    assert torch.equal(out, ref[:, : prompt.shape[1] + 50])
    assert stats.mean_accepted > 2.0 and stats.mean_accepted > untrained.mean_accepted + 0.5


def test_tree_respects_max_depth_and_scores():
    model = tiny_model("llama")
    drafter = Medusa(model, random_heads(model, 0), tree="medusa-63")
    drafter.begin(model)
    hidden = target_states(model, Batch(random_prompt(0, 5), torch.ones(1, 5, dtype=torch.long),
                                        torch.ones(1, 5, dtype=torch.bool)))[0]
    ids = random_prompt(0, 6)[0]
    full = drafter.propose(Context(ids, hidden))
    assert len(full) == len(cut(MEDUSA_63, K))
    probs = full.scores
    parents = full.parents
    assert bool(((probs > 0) & (probs <= 1)).all())
    assert all(probs[i] <= probs[p] for i, p in enumerate(parents.tolist()) if p >= 0)
    shallow = drafter.propose(Context(ids, hidden, max_depth=1))
    assert int(shallow.depths().max()) == 1
    assert len(drafter.propose(Context(ids, hidden, max_depth=0))) == 0
    assert len(drafter.propose(Context(ids, None))) == 0


def test_calibrated_tree_follows_the_cost_curve():
    model = tiny_model("llama")
    drafter = Medusa(model, random_heads(model, 0), accuracy=ACCURACY, budget=20)
    assert drafter.shape(None) == optimal_shape(torch.tensor(ACCURACY), 20).paths
    assert len(drafter.shape(None)) == 20
    steep = drafter.shape(lambda n: 1.0 + 0.2 * n)
    assert 0 < len(steep) < 20


def test_argument_errors():
    model = tiny_model("llama")
    heads = random_heads(model, 0)
    with pytest.raises(ValueError, match="depth 4"):
        Medusa(model, heads, tree=[(0,), (0, 0), (0, 0, 0), (0, 0, 0, 0)])
    with pytest.raises(ValueError, match="parents-first"):
        Medusa(model, heads, tree=[(0, 0), (0,)])
    with pytest.raises(ValueError, match="budget"):
        Medusa(model, heads, budget=0)
    with pytest.raises(ValueError, match="preset"):
        Medusa(model, heads, tree="nope")
    with pytest.raises(ValueError, match="accuracy"):
        Medusa(model, heads, accuracy=[[0.5]] * (K + 1))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        Medusa(model, heads, accuracy=[[0.9, 0.9]])
    with pytest.raises(ValueError, match="hidden size"):
        Medusa(model, MedusaHeads(48, K))
    with pytest.raises(ValueError, match="vocabulary"):
        Medusa(model, MedusaHeads(32, K, vocab_size=50))
    with pytest.raises(ValueError, match="num_heads"):
        MedusaHeads(32, 0)
    drafter = Medusa(model, heads)
    with pytest.raises(ValueError, match="vocabulary"):
        Medusa(model, MedusaHeads(32, K, vocab_size=96)).begin(tiny_model("llama", vocab=128))
    drafter.begin(model)


# ---- checkpoints --------------------------------------------------------------------------


def test_round_trip_gives_the_same_drafts(tmp_path):
    model = tiny_model("qwen")
    drafter = Medusa(model, random_heads(model, 3, own=True), accuracy=ACCURACY, metadata={"training": {"steps": 7}})
    drafter.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["drafter.safetensors", "drafter_config.json"]
    loaded = Medusa.from_pretrained(tmp_path / "m", model)
    assert loaded.metadata["training"] == {"steps": 7} and loaded.accuracy.tolist() == ACCURACY
    assert_same_drafts(model, drafter, loaded)
    Medusa.from_pretrained(tmp_path / "m", model, tree="chain-3")  # kwargs reach the constructor


def test_mismatched_target_is_refused(tmp_path):
    base = named_model("base-a")
    Medusa(base, random_heads(base, 0).float()).save_pretrained(tmp_path / "m")
    assert_refuses_other_targets(base, lambda model, **kw: Medusa.from_pretrained(tmp_path / "m", model, **kw))


def test_corrupt_or_missing_checkpoint(tmp_path):
    model = tiny_model("llama")
    good = tmp_path / "good"
    Medusa(model, random_heads(model, 0)).save_pretrained(good)
    with pytest.raises(CheckpointError, match="does not exist"):
        Medusa.from_pretrained(tmp_path / "nothing", model)

    def broken(name, edit):
        d = tmp_path / name
        Medusa(model, random_heads(model, 0)).save_pretrained(d)
        edit(d)
        return d

    weights = broken(
        "w", lambda d: (d / "drafter.safetensors").write_bytes((d / "drafter.safetensors").read_bytes()[:100])
    )
    with pytest.raises(CheckpointError, match="corrupt: drafter.safetensors"):
        Medusa.from_pretrained(weights, model)
    config = broken("c", lambda d: (d / "drafter_config.json").write_text("{not json"))
    with pytest.raises(CheckpointError, match="not valid JSON"):
        Medusa.from_pretrained(config, model)
    missing = broken("m", lambda d: (d / "drafter.safetensors").unlink())
    with pytest.raises(CheckpointError, match="missing drafter.safetensors"):
        Medusa.from_pretrained(missing, model)

    def other_config(d):
        header = json.loads((d / "drafter_config.json").read_text())
        header["config"]["num_layers"] = 3
        (d / "drafter_config.json").write_text(json.dumps(header))

    with pytest.raises(CheckpointError, match="do not match its config"):
        Medusa.from_pretrained(broken("n", other_config), model)

    def other_kind(d):
        header = json.loads((d / "drafter_config.json").read_text())
        header["drafter"] = "eagle"
        (d / "drafter_config.json").write_text(json.dumps(header))

    with pytest.raises(CheckpointError, match="holds a 'eagle' drafter"):
        Medusa.from_pretrained(broken("k", other_kind), model)


def test_save_is_atomic(tmp_path, monkeypatch):
    model = tiny_model("llama")
    first = Medusa(model, random_heads(model, 0))
    first.save_pretrained(tmp_path / "m")
    before = {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()}

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        Medusa(model, random_heads(model, 1)).save_pretrained(tmp_path / "m")
    with pytest.raises(OSError, match="disk full"):
        first.save_pretrained(tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no partial dir, no temporaries
    assert {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()} == before
    monkeypatch.undo()
    Medusa(model, random_heads(model, 1)).save_pretrained(tmp_path / "m")  # replaces a checkpoint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    assert {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()} != before


def test_shipped_lookup(tmp_path):
    model = named_model("base-a")
    with pytest.raises(CheckpointError, match=r"no shipped 'medusa' drafter for base model 'base-a' \(shipped: none\)"):
        checkpoint.shipped("medusa", model, root=tmp_path)
    Medusa(model, random_heads(model, 0).float()).save_pretrained(tmp_path / "base-a" / "medusa")
    Medusa(model, random_heads(model, 0).float()).save_pretrained(tmp_path / "base-a" / "eagle")
    assert checkpoint.shipped("medusa", model, root=tmp_path) == tmp_path / "base-a" / "medusa"
    with pytest.raises(CheckpointError, match="shipped: eagle for base-a, medusa for base-a"):
        checkpoint.shipped("medusa", named_model("base-b"), root=tmp_path)
    with pytest.raises(CheckpointError, match="no shipped 'medusa' drafter"):
        Medusa.shipped(named_model("base-b"))


# ---- tree presets -------------------------------------------------------------------------

def test_presets_are_trees_at_every_size():
    for name, paths in PRESETS.items():
        for n in range(1, len(paths) + 1):
            parents_of(paths[:n])  # raises unless parents-first
        assert len(set(paths)) == len(paths), name
    assert len(PRESETS["medusa-63"]) == 63 and max(map(len, MEDUSA_63)) == 4
    assert cut(MEDUSA_63, 2) == [p for p in MEDUSA_63 if len(p) <= 2]


def test_calibrated_reuses_the_greedy_best_paths():
    acc = torch.tensor([[0.6, 0.2], [0.5, 0.3]])
    assert calibrated(acc, 4) == [(0,), (0, 0), (1,), (0, 1)]
    assert calibrated(acc, 3, lambda n: 1.0 + n) == optimal_shape(acc, 3, lambda n: 1.0 + n).paths
