"""EAGLE feature head: exactness, the feature/token alignment (oracle and trained heads), the head's
cache across Session turns and guard pauses, tree sizing, checkpoints, and the training recipe."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen2Config, Qwen2ForCausalLM

import specdec
from conftest import assert_drafts_within, random_prompt, reference, run, tiny_model
from helpers import (
    assert_drafts_from_the_second_step,
    assert_refuses_other_targets,
    assert_same_drafts,
    data_args,
    named_model,
    random_head,
    read_log,
    train_args,
    write_prompts,
    write_target,
)
from specdec.drafter import Context, Feedback
from specdec.drafters.checkpoint import CheckpointError
from specdec.drafters.eagle import Eagle, EagleHead, FrozenTarget
from specdec.models import load_model
from specdec.training.cli import main
from specdec.training.data import Batch, collate, frequent_answer_tokens, load_examples, make_data, split, target_states
from specdec.training.eagle import EagleArguments, EagleRecipe, unroll_mask
from specdec.training.train import TrainArguments, train
from specdec.trees import LinearCost, TokenTree

FREE = LinearCost(0.0)  # verification priced as free: Eagle keeps the whole grown tree


@pytest.fixture(autouse=True)
def _free_verification(free_verify):
    """These tests check the head, its cache and its tree, not the size rule, which
    `test_tree_scores_and_sizing` checks with explicit curves."""


def states_of(model, ids: torch.Tensor) -> torch.Tensor:
    """[t, H] the target's post-norm features of a [1, t] sequence."""
    return target_states(model, Batch(ids, torch.ones_like(ids), torch.ones_like(ids).bool()))[0]


@pytest.mark.parametrize("arch", ["llama", "qwen"])
@pytest.mark.parametrize("kwargs", [{}, {"topk": 1}, {"topk": 3, "width": 2, "budget": 5, "depth": 4}])
def test_random_head_is_exact(arch, kwargs, device):
    model = tiny_model(arch, device=device)
    for seed in range(2):
        prompt = random_prompt(seed, 6).to(device)
        ref = reference(model, prompt, 30)
        out, stats = run(model, prompt, Eagle(model, random_head(model, seed), **kwargs, min_gain=0), 30)
        assert torch.equal(out, ref)
        assert all(len(s.tree) > 0 for s in stats.steps[:-1])  # every step drafted


class OracleHead(EagleHead):
    """Finds each input pair among the reference sequence's pairs (feature f_p, token x_{p+1}) and
    outputs f_{p+1}: right iff the drafter pairs features and tokens as training does. A pair that
    is no reference pair (a wrong sibling, or a misaligned feed) gets a zero output."""

    def __init__(self, model, ref: torch.Tensor):
        base = EagleHead.for_target(model)
        super().__init__(base.config, type(base.layer), type(base.rotary))
        self.to(device=model.device, dtype=model.dtype)
        self.ref, self.states = ref[0], states_of(model, ref)  # [L], [L, H]
        self.table = model.get_input_embeddings().weight.detach()
        frozen = FrozenTarget.of(model)
        # Outputs that the final norm maps back to the reference features exactly: f = w * x /
        # sqrt(mean(x^2) + eps) holds for x = s * f / w with s^2 = eps / (1 - mean((f / w)^2)).
        unit = self.states / frozen.norm_weight
        r = unit.pow(2).mean(-1, keepdim=True).clamp(max=1 - 1e-9)
        self.pre_norm = unit * (frozen.norm_eps / (1 - r)).sqrt()  # [L, H]

    def forward(self, features, embeds, position_ids, attention_mask, cache=None):
        out = super().forward(features, embeds, position_ids, attention_mask, cache)  # keeps the cache in step
        found = torch.zeros_like(out)
        tokens = (embeds[0][:, None] - self.table[None]).norm(dim=-1).argmin(-1)  # [m]
        dist = (features[0][:, None] - self.states[None]).norm(dim=-1)  # [m, L]
        for row, p in enumerate(dist.argmin(-1).tolist()):
            if float(dist[row, p]) < 1e-4 and p + 1 < len(self.ref) and int(tokens[row]) == int(self.ref[p + 1]):
                found[0, row] = self.pre_norm[p + 1]
        return found


def assert_cache_holds_real_pairs(drafter: Eagle, model, ref: torch.Tensor) -> None:
    """Every cached pair sits at its true position with the target's own feature there."""
    pos = drafter._pos
    assert pos.numel() > 0 and bool((pos[1:] > pos[:-1]).all())
    assert torch.allclose(drafter._feats, states_of(model, ref)[pos], atol=1e-8)


@pytest.mark.parametrize("arch", ["llama", "qwen"])
@pytest.mark.parametrize("prompt_len", [2, 7])
def test_oracle_head_accepts_every_depth(arch, prompt_len):
    """Off by one in either the feature rows or the tokens, the oracle would match nothing."""
    model = tiny_model(arch)
    prompt = random_prompt(11, prompt_len)
    ref = reference(model, prompt, 50)
    out, stats = run(model, prompt, Eagle(model, OracleHead(model, ref), depth=4, topk=1, min_gain=0), 40)
    assert torch.equal(out, ref[:, : prompt_len + 40])
    assert all(len(s.accepted_nodes) == 4 for s in stats.steps[:-1])
    out, stats = run(model, prompt, Eagle(model, OracleHead(model, ref), depth=4, topk=3, budget=None, min_gain=0), 40)
    assert torch.equal(out, ref[:, : prompt_len + 40])
    assert all(len(s.accepted_nodes) == 4 for s in stats.steps[:-1])


def test_one_token_prompt_drafts_nothing_first():
    model = tiny_model("llama")
    assert_drafts_from_the_second_step(model, Eagle(model, random_head(model, 0), min_gain=0))


def test_session_turns_keep_the_alignment():
    """The second turn prefills only the new part of the prompt; the features of the first turn's
    last step never arrive. The cache keeps only real pairs, and drafting stays aligned."""
    model = tiny_model("qwen")
    first = random_prompt(6, 5)
    ref1 = reference(model, first, 12)
    second = torch.cat([ref1, random_prompt(7, 4)], dim=1)
    ref2 = reference(model, second, 24)
    drafter = Eagle(model, OracleHead(model, ref2), depth=3, topk=1, min_gain=0)
    session = specdec.Session(model, drafter, guard=None, eos_token_id=[])
    assert torch.equal(session.generate(first, max_new_tokens=12), ref1)
    stats = specdec.GenerationStats()
    out = session.generate(second, max_new_tokens=16, stats=stats)
    assert torch.equal(out, ref2[:, : second.shape[1] + 16])
    assert all(len(s.accepted_nodes) == 3 for s in stats.steps[:-1])
    assert_cache_holds_real_pairs(drafter, model, ref2)
    # A random head through the same two turns: exact.
    session = specdec.Session(model, Eagle(model, random_head(model, 1), min_gain=0), guard=None, eos_token_id=[])
    session.generate(first, max_new_tokens=12)
    assert torch.equal(session.generate(second, max_new_tokens=16), ref2[:, : second.shape[1] + 16])


class PausingGuard(specdec.Guard):
    """Drafts for two steps, then pauses for two (propose is not called, its features are lost)."""

    def __init__(self):
        super().__init__()
        self.steps = 0

    def speculate(self) -> bool:
        return self.steps // 2 % 2 == 0

    def record(self, drafted: bool, tokens: int, seconds: float) -> None:
        self.steps += 1


@pytest.mark.parametrize("arch", ["llama", "qwen"])
def test_guard_pauses_leave_gaps_but_stay_exact(arch):
    model = tiny_model(arch)
    prompt = random_prompt(3, 6)
    ref = reference(model, prompt, 60)
    drafter = Eagle(model, OracleHead(model, ref), depth=3, topk=2, budget=6, min_gain=0)
    out, stats = run(model, prompt, drafter, 50, guard=PausingGuard())
    assert torch.equal(out, ref[:, : prompt.shape[1] + 50])
    drafted = [s for s in stats.steps[:-1] if len(s.tree)]
    assert len(drafted) < len(stats.steps) - 3 and all(len(s.accepted_nodes) == 3 for s in drafted)
    assert_cache_holds_real_pairs(drafter, model, ref)
    out, _ = run(model, prompt, Eagle(model, random_head(model, 2), min_gain=0), 50, guard=PausingGuard())
    assert torch.equal(out, ref[:, : prompt.shape[1] + 50])


def test_propose_from_context_alone():
    """Features missing, repeated or cached: never a crash, and the same context gives the same tree."""
    model = tiny_model("llama")
    ids = random_prompt(0, 9)[0]
    hidden = states_of(model, ids[None])[:-1]  # [8, H]: ids[:-1], as after the prefill
    drafter = Eagle(model, random_head(model, 0), depth=3, topk=2, min_gain=0)
    drafter.begin(model)
    assert len(drafter.propose(Context(ids, None, verify_cost=FREE))) == 0  # nothing cached, no features
    first = drafter.propose(Context(ids, hidden, verify_cost=FREE))
    again = drafter.propose(Context(ids, None, verify_cost=FREE))  # the root's pair is cached: fed again for its output
    assert len(first) > 0 and torch.equal(first.tokens, again.tokens) and torch.equal(first.parents, again.parents)
    assert torch.allclose(first.scores, again.scores)
    assert len(drafter.propose(Context(ids, hidden[-1:], verify_cost=FREE))) == len(first)  # only the newest row
    fresh = Eagle(model, drafter.head, depth=3, topk=2, min_gain=0)
    gap = fresh.propose(Context(ids, hidden[-2:], verify_cost=FREE))  # an earlier gap: drafts from the rows it has
    assert len(gap) > 0 and fresh._pos.tolist() == [6, 7]
    other = torch.cat([ids[:4], (ids[4:] + 1) % 90])  # diverges at 4: pairs from position 3 on are stale
    fresh.propose(Context(ids, hidden, verify_cost=FREE))
    fresh.propose(Context(other, None, verify_cost=FREE))
    assert fresh._pos.tolist() == [0, 1, 2]
    assert len(drafter.propose(Context(ids[:1], None, verify_cost=FREE))) == 0
    assert len(drafter.propose(Context(ids, hidden, max_depth=0, verify_cost=FREE))) == 0
    shallow = drafter.propose(Context(ids, hidden, max_depth=1, verify_cost=FREE))
    assert int(shallow.depths().max()) == 1


def test_tree_scores_and_sizing():
    model = tiny_model("llama")
    ids = random_prompt(1, 8)[0]
    hidden = states_of(model, ids[None])[:-1]
    drafter = Eagle(model, random_head(model, 0), depth=4, topk=4, budget=12, min_gain=0)
    drafter.begin(model)
    tree = drafter.propose(Context(ids, hidden, verify_cost=FREE))
    assert len(tree) == 12 and tree.draft_probs is None
    scores = tree.scores
    assert bool(((scores > 0) & (scores <= 1)).all())
    assert all(scores[i] <= scores[p] for i, p in enumerate(tree.parents.tolist()) if p >= 0)
    flat = drafter.propose(Context(ids, hidden, verify_cost=lambda n: 1.0))
    assert len(flat) == 12  # free verification: keep every node
    steep = drafter.propose(Context(ids, hidden, verify_cost=lambda n: 1.0 + n))
    assert 1 <= len(steep) < 12
    order = sorted(range(12), key=lambda i: (-float(scores[i]), i))
    assert steep.tokens.tolist() == tree.subtree(order[: len(steep)]).tokens.tolist()
    # Feedback that every proposal was fully accepted makes larger trees pay under the same curve.
    before = len(drafter.propose(Context(ids, hidden, verify_cost=lambda n: 1.0 + 0.3 * n)))
    deepest = tree.path_to(int(tree.depths().argmax()))
    for _ in range(30):
        drafter.update(Feedback(tree, deepest, torch.zeros(len(deepest) + 1, dtype=torch.long)))
    assert drafter.acceptance_ratio > 1.5
    assert len(drafter.propose(Context(ids, hidden, verify_cost=lambda n: 1.0 + 0.3 * n))) > before


def test_min_gain_stops_growth_by_calibrated_chance():
    """Growth stops below the first level whose best node's calibrated chance misses min_gain (the
    levels above it are drafted as without the bar); feedback that raises the acceptance ratio
    lowers the bar on draft probabilities, and the tree grows deeper again."""
    model = tiny_model("llama")
    ids = random_prompt(2, 8)[0]
    hidden = states_of(model, ids[None])[:-1]
    full = Eagle(model, random_head(model, 0), depth=4, topk=4, budget=None, min_gain=0)
    full.begin(model)
    tree = full.propose(Context(ids, hidden, verify_cost=FREE))
    depths, scores = tree.depths(), tree.scores
    best = [float(scores[depths == d].max()) for d in range(int(depths.min()), int(depths.max()) + 1)]
    assert best == sorted(best, reverse=True) and len(best) == 4
    bar = (best[1] + best[2]) / 2  # above the third level's best node, below the second's
    cut = Eagle(model, full.head, depth=4, topk=4, budget=None, min_gain=bar)
    cut.begin(model)
    shallow = cut.propose(Context(ids, hidden, verify_cost=FREE))
    keep = [i for i in range(len(tree)) if int(depths[i]) <= int(depths.min()) + 2]
    assert shallow.tokens.tolist() == tree.subtree(keep).tokens.tolist()  # three levels, no fourth step
    chain = TokenTree(
        torch.zeros(4, dtype=torch.long), torch.arange(-1, 3), scores=torch.full((4,), 1e-9, dtype=torch.float64)
    )
    for _ in range(100):  # unlikely proposals fully accepted: the ratio rises, the bar on q falls
        cut.update(Feedback(chain, [0, 1, 2, 3], torch.zeros(5, dtype=torch.long)))
    assert cut.acceptance_ratio * best[3] > bar
    assert len(cut.propose(Context(ids, hidden, verify_cost=FREE))) == len(tree)


def test_min_gain_with_nothing_accepted_lately_drafts_one_level():
    model = tiny_model("llama")
    ids = random_prompt(3, 8)[0]
    hidden = states_of(model, ids[None])[:-1]
    chain = TokenTree(
        torch.zeros(2, dtype=torch.long), torch.arange(-1, 1), scores=torch.full((2,), 0.5, dtype=torch.float64)
    )
    for min_gain in (0.0, 0.1):
        drafter = Eagle(model, random_head(model, 0), depth=4, topk=2, budget=None, min_gain=min_gain,
                        calibration_decay=0.01)
        drafter.begin(model)
        for _ in range(200):  # every proposal rejected: the accepted sum underflows to 0
            drafter.update(Feedback(chain, [], torch.zeros(1, dtype=torch.long)))
        assert drafter.acceptance_ratio == 0
        drafter.size = lambda tree, verify_cost: tree  # the grown tree (sizing at ratio 0 keeps one node)
        tree = drafter.propose(Context(ids, hidden, verify_cost=FREE))
        assert int(tree.depths().max()) == (4 if min_gain == 0 else 1) + int(tree.depths().min()) - 1


def test_argument_errors():
    model = tiny_model("llama")
    head = random_head(model, 0)
    for kwargs, message in [({"depth": 0}, "depth"), ({"topk": 0}, "topk"), ({"width": 0}, "width"),
                            ({"budget": 0}, "budget"), ({"min_confidence": 1.0}, "min_confidence"),
                            ({"min_gain": 1.0}, "min_gain"), ({"min_gain": -0.1}, "min_gain"),
                            ({"calibration_decay": 1.0}, "calibration_decay")]:
        with pytest.raises(ValueError, match=message):
            Eagle(model, head, **kwargs)
    with pytest.raises(TypeError, match="EagleHead"):
        Eagle(model, torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="hidden size"):
        Eagle(named_model("x", hidden=48), head)
    with pytest.raises(ValueError, match="Qwen2DecoderLayer"):
        Eagle(tiny_model("qwen"), head)
    assert tiny_model("llama").config.num_hidden_layers == 2  # the head's config is a copy


def test_training_alignment_matches_drafting():
    """A head fitted with the recipe's loss on the model's own greedy continuation is accepted when
    the model generates it again: training pairs (f_p, x_{p+1}) as the drafter does."""
    model = tiny_model("llama")
    prompt = random_prompt(5, 8)
    ref = reference(model, prompt, 60)
    answer = torch.arange(ref.shape[1])[None] >= prompt.shape[1]
    batch = Batch(ref, torch.ones_like(ref), answer)
    batch.hidden_states = target_states(model, batch)
    recipe = EagleRecipe(EagleArguments(unroll=2))
    torch.manual_seed(0)
    head = recipe.build(model, TrainArguments())
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    for _ in range(120):
        loss, _ = recipe.loss(head, model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(p.grad is None for p in model.parameters())  # the target stays frozen and untouched
    head.eval()
    with torch.no_grad():
        metrics = recipe.evaluate(head, model, iter([batch]))["eval"]
    assert metrics["acceptance"][0] > 0.8 and metrics["expected_chain_tokens"] > 3
    _, untrained = run(model, prompt, Eagle(model, recipe.build(model, TrainArguments()), topk=1, min_gain=0), 50)
    out, stats = run(model, prompt, Eagle(model, head, topk=1, min_gain=0), 50)
    assert torch.equal(out, ref[:, : prompt.shape[1] + 50])
    assert stats.mean_accepted > 3.0 and stats.mean_accepted > untrained.mean_accepted + 1.5


def test_training_unroll_computes_what_drafting_computes():
    """Step k of the training unroll at anchor t - 2 is the drafter's depth-k step of a chain: same
    pairs, positions and attention, so the same draft probabilities (a token or position offset
    on either side would change them)."""
    model = tiny_model("qwen")
    ids = random_prompt(8, 9)[0]
    head = random_head(model, 4)
    drafter = Eagle(model, head, depth=3, topk=1, min_gain=0)
    drafter.begin(model)
    tree = drafter.propose(Context(ids, states_of(model, ids[None])[:-1], verify_cost=FREE))
    assert tree.is_chain and len(tree) == 3
    seq = torch.cat([ids, tree.tokens[:2]])[None]  # the chain's tokens as the continuation
    batch = Batch(seq, torch.ones_like(seq), torch.ones_like(seq).bool())
    batch.hidden_states = target_states(model, batch)
    outs, _ = EagleRecipe(EagleArguments())._unroll(head, model, batch, 3)
    t = ids.numel()
    frozen = FrozenTarget.of(model)
    probs = [torch.softmax(frozen.logits(out[0, t - 2 + k]), -1)[tree.tokens[k]] for k, out in enumerate(outs)]
    assert torch.allclose(torch.stack(probs).cumprod(0), tree.scores, rtol=1e-9)


def test_unroll_mask_is_a_draft_from_each_anchor():
    allowed = unroll_mask(5, 3, torch.float64) == 0  # [1, 1, 5, 15]
    # Query p = 4 in step 3 drafts depth 3 from anchor 2: real pairs 0..2, step 2's key at 3, step 3's at 4.
    assert allowed[0, 0, 4].nonzero().flatten().tolist() == [0, 1, 2, 5 + 3, 10 + 4]
    assert (unroll_mask(4, 1, torch.float64) == 0)[0, 0].tolist() == torch.ones(4, 4).tril().bool().tolist()


# ---- checkpoints --------------------------------------------------------------------------

def test_round_trip_gives_the_same_drafts(tmp_path):
    model = tiny_model("qwen")
    drafter = Eagle(model, random_head(model, 3), metadata={"training": {"steps": 7}})
    drafter.save_pretrained(tmp_path / "e")
    header = json.loads((tmp_path / "e" / "drafter_config.json").read_text())
    assert header["drafter"] == "eagle" and header["config"]["decoder_layer"] == "Qwen2DecoderLayer"
    loaded = Eagle.from_pretrained(tmp_path / "e", model, depth=3)
    assert loaded.metadata["training"] == {"steps": 7} and loaded.depth == 3
    assert_same_drafts(model, drafter, Eagle.from_pretrained(tmp_path / "e", model))


def test_mismatched_target_is_refused(tmp_path):
    base = named_model("base-a")
    Eagle(base, random_head(base, 0)).save_pretrained(tmp_path / "e")
    assert_refuses_other_targets(base, lambda model, **kw: Eagle.from_pretrained(tmp_path / "e", model, **kw))
    qwen = Qwen2ForCausalLM(Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, name_or_path="/x/base-a"))
    message = "'LlamaDecoderLayer' layers but this model's layers are 'Qwen2DecoderLayer'"
    with pytest.raises(CheckpointError, match=message):
        Eagle.from_pretrained(tmp_path / "e", qwen)
    weights = tmp_path / "e" / "drafter.safetensors"
    tensors = load_file(str(weights))
    tensors["fc.weight"] = tensors["fc.weight"][:, :10].contiguous()
    save_file(tensors, str(weights))
    with pytest.raises(CheckpointError, match="do not match its config"):
        Eagle.from_pretrained(tmp_path / "e", base)
    with pytest.raises(CheckpointError, match="no shipped 'eagle' drafter"):
        Eagle.shipped(named_model("base-b"))


def test_an_edited_config_shape_is_refused(tmp_path):
    """A drafter_config.json whose hidden_size no longer matches the weights is a corrupt
    checkpoint for every trained drafter, not only for those built from their config."""
    from specdec.drafters.early_exit import EarlyExit, ExitAdapter
    from specdec.drafters.medusa import Medusa, MedusaHeads

    model = tiny_model("llama")
    hidden = model.config.hidden_size
    drafters = [(Eagle, Eagle(model, random_head(model, 0))), (Medusa, Medusa(model, MedusaHeads(hidden, 2).double())),
                (EarlyExit, EarlyExit(model, adapter=ExitAdapter(hidden, 1, rank=4).double()))]
    for cls, drafter in drafters:
        directory = drafter.save_pretrained(tmp_path / cls.__name__)
        cls.from_pretrained(directory, model)  # as saved
        header = json.loads((directory / "drafter_config.json").read_text())
        header["config"]["hidden_size"] = 2 * hidden
        (directory / "drafter_config.json").write_text(json.dumps(header))
        with pytest.raises(CheckpointError, match=f"corrupt.*hidden_size={2 * hidden}"):
            cls.from_pretrained(directory, model)


@pytest.mark.parametrize("guard", [None, PausingGuard])
def test_draft_vocabulary_admits_the_contexts_tokens(guard, device):
    """The draft vocabulary holds only the continuation's tokens that the prompt lacks: an oracle
    head accepts every depth only if the prompt's (and the paused steps') tokens are admitted."""
    model = tiny_model("llama", device=device)
    for seed in range(20):  # the test needs an answer that reuses prompt tokens
        prompt = random_prompt(seed, 7).to(device)
        ref = reference(model, prompt, 50)
        continuation = set(ref[0, 7:].tolist())
        if continuation & set(prompt[0].tolist()):
            break
    assert continuation & set(prompt[0].tolist())
    small = torch.tensor(sorted(continuation - set(prompt[0].tolist())))
    drafter = Eagle(model, OracleHead(model, ref), depth=4, topk=1, draft_vocab=small, min_gain=0)
    out, stats = run(model, prompt, drafter, 40, guard=guard and guard())
    assert torch.equal(out, ref[:, :47])
    drafted = [s for s in stats.steps[:-1] if len(s.tree)]
    assert drafted and all(len(s.accepted_nodes) == 4 for s in drafted)


def test_draft_vocabulary_forgets_the_last_requests_tokens_and_stays_exact(tmp_path):
    model = tiny_model("llama")
    vocab_size = model.config.vocab_size
    small = torch.tensor([3, 9, 1, 30, 17, 9])  # unsorted, with a repeat: kept sorted and unique
    drafter = Eagle(model, random_head(model, 0), topk=3, depth=4, budget=None, draft_vocab=small, min_gain=0)
    assert drafter.draft_vocab.tolist() == [1, 3, 9, 17, 30]
    assert_drafts_within(model, drafter, small)  # three requests: each from small and its own context
    # The whole vocabulary as the draft vocabulary drafts what no draft vocabulary drafts.
    everything = Eagle(model, random_head(model, 5), draft_vocab=torch.arange(vocab_size), min_gain=0)
    assert_same_drafts(model, Eagle(model, random_head(model, 5), min_gain=0), everything)
    # The vocabulary is saved and loaded with the head; an explicit draft_vocab=None drops it.
    everything.save_pretrained(tmp_path / "e")
    loaded = Eagle.from_pretrained(tmp_path / "e", model)
    assert torch.equal(loaded.draft_vocab, torch.arange(vocab_size))
    assert Eagle.from_pretrained(tmp_path / "e", model, draft_vocab=None).draft_vocab is None
    assert json.loads((tmp_path / "e" / "drafter_config.json").read_text())["config"]["draft_vocab_size"] == vocab_size
    weights = tmp_path / "e" / "drafter.safetensors"
    tensors = load_file(str(weights))
    for bad, message in [(torch.tensor([0, vocab_size]), "outside the target's vocabulary"),
                         (torch.arange(vocab_size).float(), "integer"), (torch.arange(5), "draft_vocab_size=96")]:
        tensors["draft_vocab"] = bad
        save_file(tensors, str(weights))
        with pytest.raises(CheckpointError, match=f"corrupt.*{message}"):
            Eagle.from_pretrained(tmp_path / "e", model)
    for bad, message in [(torch.tensor([], dtype=torch.long), "non-empty"), (torch.tensor([[1, 2]]), "1-D"),
                         (torch.tensor([1.0]), "integer"), (torch.tensor([-1, 2]), "outside")]:
        with pytest.raises(ValueError, match=message):
            Eagle(model, random_head(model, 0), draft_vocab=bad)


# ---- training -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("eagle-training")
    write_target(root / "tiny-target")
    write_prompts(root / "prompts.jsonl", 10, seed=0)
    make_data(data_args(root, "data"))
    make_data(data_args(root, "data-nohidden", save_hidden_states=False))
    return root


RECIPE = EagleArguments(unroll=2, eval_depth=3, eval_topk=3)


def test_training_lowers_the_loss_and_resumes(workdir):
    directory = train(train_args(workdir, workdir / "data", "run", learning_rate=1e-2), EagleRecipe(RECIPE))
    log = read_log(workdir / "run")
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) == 12 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 * 0.8
    assert {"loss_feature1", "loss_ce2"} <= set(log[0])
    model = load_model(str(workdir / "tiny-target"))[0]
    drafter = Eagle.from_pretrained(directory, model)
    meta = drafter.metadata
    assert meta["training"]["steps"] == 12 and meta["training"]["seconds"] > 0
    assert meta["training"]["train_answer_tokens"] > 0 and meta["training"]["arguments"]["unroll"] == 2
    ev = meta["eval"]
    assert len(ev["acceptance"]) == 3 and "top3" in ev and ev["expected_chain_tokens"] >= 1.0
    assert all(0 <= a <= 1 for a in ev["acceptance"])
    prompt = torch.tensor([[2, 4, 10, 3, 2, 5]])
    out, _ = run(model, prompt, drafter, 20)
    assert torch.equal(out, reference(model, prompt, 20))
    # Interrupted after step 8, resumed to 12: the same losses as the straight run.
    train(train_args(workdir, workdir / "data", "part", learning_rate=1e-2, max_steps=8), EagleRecipe(RECIPE))
    train(train_args(workdir, workdir / "data", "part", learning_rate=1e-2, resume=True), EagleRecipe(RECIPE))
    resumed = [r["loss"] for r in read_log(workdir / "part") if "loss" in r]
    assert resumed == pytest.approx(losses, rel=1e-5)


def test_features_from_the_target_match_stored_ones(workdir):
    """Without stored states the target computes the same (post-norm) features."""
    stored = train(train_args(workdir, workdir / "data", "s", max_steps=2, save_steps=2), EagleRecipe(RECIPE))
    computed = train(train_args(workdir, workdir / "data-nohidden", "c", max_steps=2, save_steps=2),
                     EagleRecipe(RECIPE))
    a = [r["loss"] for r in read_log(workdir / "s") if "loss" in r]
    b = [r["loss"] for r in read_log(workdir / "c") if "loss" in r]
    assert a == pytest.approx(b, rel=1e-2)  # stored states are fp16
    assert stored.name == computed.name == "drafter"


def test_cli_help_and_run(workdir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["eagle", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert all(f in text for f in ["--unroll", "--step_decay", "--ce_weight", "--init_from_last_layer", "--resume"])
    out = workdir / "cli"
    assert main(["eagle", "--model", str(workdir / "tiny-target"), "--data", str(workdir / "data"), "--output-dir",
                 str(out), "--max-steps", "2", "--batch-size", "2", "--unroll", "2", "--save-steps", "2"]) == 0
    meta = json.loads((out / "drafter" / "drafter_config.json").read_text())["metadata"]
    assert meta["training"]["command"].startswith("specdec train eagle --model")


def test_draft_vocab_command_keeps_the_most_frequent_answer_tokens(workdir):
    head = train(train_args(workdir, workdir / "data", "dv", max_steps=2, save_steps=2), EagleRecipe(RECIPE))
    out = workdir / "dv-vocab"
    assert main(["draft-vocab", "--model", str(workdir / "tiny-target"), "--drafter", str(head), "--data",
                 str(workdir / "data"), "--size", "8", "--output-dir", str(out)]) == 0
    model = load_model(str(workdir / "tiny-target"))[0]
    drafter = Eagle.from_pretrained(out, model)
    counts = torch.zeros(model.config.vocab_size, dtype=torch.long)
    rows = load_examples(workdir / "data")
    for i in split(len(rows), 0.2, 0)[0].tolist():  # the head's training split (train_args: eval_fraction 0.2, seed 0)
        row = rows[i]
        counts += torch.bincount(row["input_ids"][int(row["prompt_length"]):], minlength=counts.numel())
    assert drafter.draft_vocab.numel() == 8 and int(counts[drafter.draft_vocab].min()) >= int(counts.sort().values[-8])
    record = drafter.metadata["draft_vocab"]
    assert record["size"] == 8 and record["command"].startswith("specdec train draft-vocab --model")
    assert 0 < record["held_out_coverage"] <= 1 and record["eval_fraction"] == 0.2  # train_args' split
    assert drafter.metadata["training"]["steps"] == 2  # the training record is kept
    prompt = torch.tensor([[2, 4, 10, 3, 2, 5]])
    assert torch.equal(run(model, prompt, drafter, 20)[0], reference(model, prompt, 20))
    with pytest.raises(ValueError, match="size must be >= 1"):
        frequent_answer_tokens(workdir / "data", 0, model.config.vocab_size)
    with pytest.raises(ValueError, match="another tokenizer"):
        frequent_answer_tokens(workdir / "data", 8, 5)


def test_recipe_argument_errors():
    for kwargs, message in [({"unroll": 0}, "unroll"), ({"step_decay": 0}, "step-decay"),
                            ({"feature_weight": 0, "ce_weight": 0}, "not both 0")]:
        with pytest.raises(ValueError, match=message):
            EagleRecipe(EagleArguments(**kwargs))


def test_training_over_a_draft_vocabulary(workdir, capsys):
    """--draft-vocab-size N: the cross-entropy runs over the N most frequent answer tokens of the
    training split (labels outside them are not scored), and the saved head drafts over them."""
    model = load_model(str(workdir / "tiny-target"))[0]
    size = 6
    args = EagleArguments(unroll=1, eval_depth=2, eval_topk=size + 2, feature_weight=0.0, ce_weight=1.0,
                          draft_vocab_size=size)
    run_args = train_args(workdir, workdir / "data", "tv", max_steps=3, save_steps=3, learning_rate=1e-2)
    directory = train(run_args, EagleRecipe(args))
    drafter = Eagle.from_pretrained(directory, model)
    vocab, coverage = frequent_answer_tokens(workdir / "data", size, model.config.vocab_size, eval_fraction=0.2, seed=0)
    assert torch.equal(drafter.draft_vocab, vocab.sort().values)
    record = drafter.metadata["draft_vocab"]
    assert record["size"] == size and record["held_out_coverage"] == pytest.approx(coverage) and coverage < 1
    assert drafter.metadata["training"]["arguments"]["draft_vocab_size"] == size
    prompt = torch.tensor([[2, 4, 10, 3, 2, 5]])
    assert torch.equal(run(model, prompt, drafter, 20)[0], reference(model, prompt, 20))

    # The loss, by hand: lm_head rows of the vocabulary, labels mapped to their columns, others dropped.
    recipe = EagleRecipe(args)
    head = recipe.build(model, run_args)
    rows = load_examples(workdir / "data")
    rows.set_format("torch")
    batch = collate(rows[[0, 1, 2]])
    loss, _ = recipe.loss(head, model, batch)
    (out,), _ = recipe._unroll(head, model, batch, 1)
    out = out.detach()
    labels = torch.nn.functional.pad(batch.input_ids[:, 2:], (0, 2))
    keep = recipe._valid(batch, 1) & torch.isin(labels, vocab)
    assert keep.any() and not keep.equal(recipe._valid(batch, 1))  # some labels are outside the vocabulary
    columns = (labels[keep][:, None] == drafter.draft_vocab[None]).float().argmax(-1)
    with torch.no_grad():
        logits = out[keep] @ model.get_output_embeddings().weight[drafter.draft_vocab].T
        expected = torch.nn.functional.cross_entropy(logits.float(), columns)
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-5)
    # Held out, a label outside the vocabulary is a miss at any k (top-k with k > the vocabulary's
    # size holds exactly the labels inside it).
    with torch.no_grad():
        metrics = recipe.evaluate(head, model, iter([batch]))["eval"]
    n = int(recipe._valid(batch, 1).sum())
    assert metrics["positions"][0] == n
    assert metrics["top1"][0] == pytest.approx(float((logits.argmax(-1) == columns).sum()) / n)
    assert metrics[f"top{size + 2}"][0] == pytest.approx(float(keep.sum()) / n)
    # A head trained over its own vocabulary is not given another one after the fact.
    capsys.readouterr()
    assert main(["draft-vocab", "--model", str(workdir / "tiny-target"), "--drafter", str(directory), "--data",
                 str(workdir / "data"), "--size", "8", "--output-dir", str(workdir / "tv-again")]) == 2
    assert "trained over its own draft vocabulary" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--draft-vocab-size must be >= 0"):
        EagleRecipe(EagleArguments(draft_vocab_size=-1))


def test_training_on_several_data_dirs(workdir):
    """--data a,b trains on both make-data outputs, concatenated, keeping the columns they share
    (here the target computes the features b did not store)."""
    both = f"{workdir / 'data'},{workdir / 'data-nohidden'}"
    a, b = load_examples(workdir / "data"), load_examples(workdir / "data-nohidden")
    with pytest.warns(UserWarning, match="not every part stored hidden states"):
        ds = load_examples(both)
    assert ds.num_rows == a.num_rows + b.num_rows and "hidden_states" not in ds.column_names
    assert torch.equal(ds[a.num_rows]["input_ids"], b[0]["input_ids"])
    with pytest.warns(UserWarning, match="not every part stored hidden states"):
        directory = train(train_args(workdir, both, "multi", max_steps=2, save_steps=2), EagleRecipe(RECIPE))
    model = load_model(str(workdir / "tiny-target"))[0]
    meta = Eagle.from_pretrained(directory, model).metadata["training"]
    assert meta["train_examples"] + meta["eval_examples"] == ds.num_rows
    assert [part["examples"] for part in meta["data"]["parts"]] == [a.num_rows, b.num_rows]
    with pytest.raises(ValueError, match="empty entry"):
        load_examples(f"{workdir / 'data'},")
    other = workdir / "data-other-target"
    shutil.copytree(workdir / "data", other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["settings"]["model"] = "another-model"
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="different targets"):
        load_examples(f"{workdir / 'data'},{other}")
