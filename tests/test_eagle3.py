"""EAGLE-3 heads: exactness, the verifier's aux-layer states, the published layouts (written key by
key, exported, imported, refused), a reference forward from the layout's definition, the recipe
and rescored (teacher-forced) training data."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from conftest import random_prompt, reference, run, tiny_model
from helpers import (
    assert_same_drafts,
    data_args,
    named_model,
    random_heads,
    read_log,
    train_args,
    write_prompts,
    write_target,
)
from specdec.drafter import Context
from specdec.drafters import Medusa, Merge, PromptLookup
from specdec.drafters.checkpoint import CheckpointError
from specdec.drafters.eagle import Eagle, FrozenTarget
from specdec.drafters.eagle3 import Eagle3Head
from specdec.drafters.eagle3_formats import SPECFORGE, SPECULATORS, export
from specdec.models import load_model
from specdec.training.cli import main
from specdec.training.data import Batch, load_examples, make_data, target_states
from specdec.training.eagle import Eagle3Arguments, Eagle3Recipe
from specdec.training.train import TrainArguments, train
from specdec.trees import LinearCost

FREE = LinearCost(0.0)


@pytest.fixture(autouse=True)
def _free_verification(free_verify):
    """Trees are kept whole: these tests check the head, not the size rule."""


def random_head3(model, seed: int, vocab: torch.Tensor | None = None, **options) -> Eagle3Head:
    torch.manual_seed(seed)
    head = Eagle3Head.for_target(model, vocab, aux_layers=options.pop("aux_layers", (0, 1, 2)), **options)
    for name, p in head.named_parameters():
        torch.nn.init.normal_(p, mean=1.0 if "norm" in name else 0.0, std=0.3)
    return head


@pytest.mark.parametrize("arch", ["llama", "qwen"])
@pytest.mark.parametrize("kwargs", [{}, {"topk": 1}, {"topk": 3, "width": 2, "budget": 5, "depth": 4}])
def test_random_head_is_exact(arch, kwargs):
    model = tiny_model(arch, layers=3)
    vocab = torch.arange(0, model.config.vocab_size, 3)  # a draft vocabulary: d2t is not all zeros
    for seed in range(2):
        prompt = random_prompt(seed, 6)
        out, stats = run(model, prompt, Eagle(model, random_head3(model, seed, vocab), **kwargs, min_gain=0), 30)
        assert torch.equal(out, reference(model, prompt, 30))
        assert all(len(s.tree) > 0 for s in stats.steps[:-1])
        drafted = torch.cat([s.tree.tokens for s in stats.steps])
        assert bool(torch.isin(drafted, vocab).all())  # columns map to token ids through d2t


def test_the_verifier_hands_over_the_aux_layers_side_by_side():
    model = tiny_model("llama", layers=3)
    seen = []

    class Spy(Eagle):
        def propose(self, ctx):
            seen.append((ctx.input_ids.clone(), ctx.hidden_states.clone()))
            return super().propose(ctx)

    drafter = Spy(model, random_head3(model, 0, aux_layers=(3, 0, 2)), min_gain=0)
    assert drafter.hidden_layers == (3, 0, 2)
    run(model, random_prompt(3, 7), drafter, 12)
    for ids, hidden in seen[1:]:
        out = model(ids[None], output_hidden_states=True).hidden_states
        want = torch.cat([out[i][0] for i in (3, 0, 2)], dim=-1)[-hidden.shape[0] - 1 : -1]
        assert hidden.shape[1] == 3 * model.config.hidden_size
        assert torch.allclose(hidden, want, atol=1e-9)


def test_compositions_take_one_kind_of_head():
    model = tiny_model("llama", layers=3)
    merged = Merge([Eagle(model, random_head3(model, 0)), PromptLookup()])
    assert merged.hidden_layers == (0, 1, 2)
    prompt = random_prompt(2, 8)
    assert torch.equal(run(model, prompt, merged, 20)[0], reference(model, prompt, 20))
    with pytest.raises(ValueError, match="different target hidden states"):
        _ = Merge([Eagle(model, random_head3(model, 0)), Medusa(model, random_heads(model, 0))]).hidden_layers


def test_unroll_computes_what_drafting_computes():
    """The recipe's step k at anchor t - 2 is the drafter's depth-k chain step (pairs, positions,
    attention, the unprojected feedback of the head's own outputs)."""
    model = tiny_model("qwen", layers=3)
    ids = random_prompt(8, 9)[0]
    head = random_head3(model, 4)
    drafter = Eagle(model, head, depth=3, topk=1, min_gain=0)
    drafter.begin(model)
    states = target_states(model, Batch(ids[None], torch.ones_like(ids[None]), torch.ones_like(ids[None]).bool()),
                           head.aux_layers)[0]
    tree = drafter.propose(Context(ids, states[:-1], verify_cost=FREE))
    assert tree.is_chain and len(tree) == 3
    seq = torch.cat([ids, tree.tokens[:2]])[None]
    batch = Batch(seq, torch.ones_like(seq), torch.ones_like(seq).bool())
    batch.hidden_states = target_states(model, batch, head.aux_layers)
    recipe = Eagle3Recipe(Eagle3Arguments())
    recipe._head = head
    outs, _ = recipe._unroll(head, model, batch, 3)
    t = ids.numel()
    probs = [torch.softmax(head.logits(out[0, t - 2 + k]), -1)[int((head.draft_ids == tree.tokens[k]).nonzero())]
             for k, out in enumerate(outs)]
    assert torch.allclose(torch.stack(probs).cumprod(0), tree.scores, rtol=1e-5)  # drafts score in float32


def test_training_alignment_matches_drafting():
    """A head fitted on the model's own greedy continuation is accepted when the model generates it
    again (the recipe pairs states and tokens as the drafter does)."""
    model = tiny_model("llama", layers=3)
    prompt = random_prompt(5, 8)
    ref = reference(model, prompt, 60)
    batch = Batch(ref, torch.ones_like(ref), torch.arange(ref.shape[1])[None] >= prompt.shape[1])
    recipe = Eagle3Recipe(Eagle3Arguments(unroll=2, draft_vocab_size=0, aux_layers="0,1,2"))
    torch.manual_seed(0)
    head = recipe.build(model, TrainArguments())
    batch.hidden_states = target_states(model, batch, recipe.hidden_layers)
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    for _ in range(120):
        loss, parts = recipe.loss(head, model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert "loss_ce2" in parts and not any(k.startswith("loss_feature") for k in parts)
    assert all(p.grad is None for p in model.parameters())
    head.eval()
    with torch.no_grad():
        metrics = recipe.evaluate(head, model, iter([batch]))["eval"]
    assert metrics["acceptance"][0] > 0.8 and "loss_feature" not in metrics
    out, stats = run(model, prompt, Eagle(model, head, topk=1, min_gain=0), 50)
    assert torch.equal(out, ref[:, : prompt.shape[1] + 50])
    assert stats.mean_accepted > 3.0


# ---- the published layouts ------------------------------------------------------------------

def _rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Llama's rotary embedding (rotate-half form), written from its definition."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = positions.double()[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(x), torch.cat([ang.sin()] * 2, -1).to(x)
    half = torch.cat([-x[..., d // 2 :], x[..., : d // 2]], -1)
    return x * cos + half * sin


def reference_logits(w: dict, cfg: dict, fused: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
    """One EAGLE-3 step over m positions (causal, no cache) from the SpecForge layout's weights and
    config alone: [m, 3H] fused states, [m, H] embeddings -> [m, vocab] logits (-inf off the draft
    vocabulary), as serving engines compute them."""
    eps, heads, kv, dim = cfg["rms_norm_eps"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]

    def rms(x, weight):
        return weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    m = fused.shape[0]
    h = fused @ w["fc.weight"].T
    x = torch.cat([rms(embeds, w["midlayer.input_layernorm.weight"]), rms(h, w["midlayer.hidden_norm.weight"])], -1)
    pos = torch.arange(m)
    q = _rope((x @ w["midlayer.self_attn.q_proj.weight"].T).view(m, heads, dim).transpose(0, 1), pos, cfg["rope_theta"])
    k = _rope((x @ w["midlayer.self_attn.k_proj.weight"].T).view(m, kv, dim).transpose(0, 1), pos, cfg["rope_theta"])
    v = (x @ w["midlayer.self_attn.v_proj.weight"].T).view(m, kv, dim).transpose(0, 1)
    k, v = k.repeat_interleave(heads // kv, 0), v.repeat_interleave(heads // kv, 0)
    scores = (q @ k.transpose(1, 2)) / math.sqrt(dim) + torch.full((m, m), -math.inf).triu(1).to(q)
    attn = (scores.softmax(-1) @ v).transpose(0, 1).reshape(m, heads * dim) @ w["midlayer.self_attn.o_proj.weight"].T
    h = h + attn
    y = rms(h, w["midlayer.post_attention_layernorm.weight"])
    h = h + (F.silu(y @ w["midlayer.mlp.gate_proj.weight"].T) * (y @ w["midlayer.mlp.up_proj.weight"].T)) \
        @ w["midlayer.mlp.down_proj.weight"].T
    draft = rms(h, w["norm.weight"]) @ w["lm_head.weight"].T  # [m, V']
    out = torch.full((m, cfg["vocab_size"]), -math.inf, dtype=draft.dtype)
    out[:, torch.arange(draft.shape[1]) + w["d2t"]] = draft
    return out


def write_specforge(directory, model, seed: int = 0, draft: int = 40, intermediate: int = 48, aux=(1, 0, 2),
                    drop: tuple[str, ...] = ()) -> tuple[dict, dict]:
    """A head in the SpecForge layout written key by key from the published names and shapes."""
    g = torch.Generator().manual_seed(seed)
    c = model.config
    hidden, heads, kv = c.hidden_size, c.num_attention_heads, c.num_key_value_heads
    dim = hidden // heads
    vocab = model.get_output_embeddings().weight.shape[0]

    def r(*shape, mean=0.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * 0.3 + mean).float()

    ids = torch.randperm(vocab, generator=g)[:draft].sort().values
    w = {"fc.weight": r(hidden, 3 * hidden), "midlayer.input_layernorm.weight": r(hidden, mean=1),
         "midlayer.hidden_norm.weight": r(hidden, mean=1),
         "midlayer.post_attention_layernorm.weight": r(hidden, mean=1),
         "midlayer.self_attn.q_proj.weight": r(heads * dim, 2 * hidden),
         "midlayer.self_attn.k_proj.weight": r(kv * dim, 2 * hidden),
         "midlayer.self_attn.v_proj.weight": r(kv * dim, 2 * hidden),
         "midlayer.self_attn.o_proj.weight": r(hidden, heads * dim),
         "midlayer.mlp.gate_proj.weight": r(intermediate, hidden),
         "midlayer.mlp.up_proj.weight": r(intermediate, hidden),
         "midlayer.mlp.down_proj.weight": r(hidden, intermediate),
         "norm.weight": r(hidden, mean=1), "lm_head.weight": r(draft, hidden),
         "d2t": ids - torch.arange(draft), "t2d": torch.zeros(vocab, dtype=torch.bool).index_fill_(0, ids, True)}
    cfg = {"architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "hidden_size": hidden,
           "intermediate_size": intermediate, "num_hidden_layers": 1, "num_attention_heads": heads,
           "num_key_value_heads": kv, "head_dim": dim, "hidden_act": "silu", "max_position_embeddings": 256,
           "rms_norm_eps": 1e-6, "rope_theta": float(c.rope_parameters["rope_theta"]), "tie_word_embeddings": False,
           "vocab_size": vocab, "draft_vocab_size": draft, "target_hidden_size": hidden, "norm_before_residual": False,
           "eagle_config": {"use_aux_hidden_state": True, "eagle_aux_hidden_state_layer_ids": list(aux)}}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(cfg))
    save_file({k: v for k, v in w.items() if k not in drop}, str(directory / "model.safetensors"))
    return w, cfg


def fused_states(model, ids: torch.Tensor, aux) -> torch.Tensor:
    out = model(ids[None], output_hidden_states=True).hidden_states
    return torch.cat([out[i][0] for i in aux], -1)


def test_a_specforge_head_written_key_by_key_loads_drafts_exactly_and_matches_the_reference(tmp_path):
    model = tiny_model("llama", layers=3).float()
    w, cfg = write_specforge(tmp_path / "sf", model)
    drafter = Eagle.from_pretrained(tmp_path / "sf", model, min_gain=0)
    assert drafter.hidden_layers == (1, 0, 2)  # read from the nested eagle_config
    ids = random_prompt(1, 7)[0]
    fused, embeds = fused_states(model, ids, (1, 0, 2)), model.get_input_embeddings()(ids)
    # pair p is (states at p, token p + 1): feed tokens 1.. beside states ..t-2
    want = reference_logits(w, cfg, fused[:-1], embeds[1:])
    head = drafter.head
    with torch.no_grad():
        out = head(fused[None, :-1], embeds[None, 1:], torch.arange(ids.numel() - 1)[None],
                   torch.zeros(1, 1, ids.numel() - 1, ids.numel() - 1).masked_fill_(
                       torch.ones(ids.numel() - 1, ids.numel() - 1).triu(1).bool(), -1e30))
        got = torch.full_like(want, -math.inf)
        got[:, head.draft_ids] = head.logits(out)[0]
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)
    prompt = random_prompt(2, 6)
    out, stats = run(model, prompt, drafter, 25)
    assert torch.equal(out, reference(model, prompt, 25)) and all(len(s.tree) for s in stats.steps[1:-1])


@pytest.mark.parametrize("layout", [SPECFORGE, SPECULATORS])
def test_export_then_import_drafts_the_same(tmp_path, layout):
    model = tiny_model("qwen", layers=3).float()
    drafter = Eagle(model, random_head3(model, 1, torch.arange(5, 80), intermediate_size=40), min_gain=0)
    embedding = model.get_input_embeddings().weight
    export(drafter.head, tmp_path / "x", layout, dtype="float32", verifier="tiny", embedding=embedding)
    cfg = json.loads((tmp_path / "x" / "config.json").read_text())
    weights = load_file(str(tmp_path / "x" / "model.safetensors"))
    keys = set(weights)
    if layout == SPECFORGE:
        assert cfg["architectures"] == ["LlamaForCausalLMEagle3"] and cfg["num_hidden_layers"] == 1
        assert cfg["eagle_config"] == {"use_aux_hidden_state": True, "eagle_aux_hidden_state_layer_ids": [0, 1, 2]}
        assert cfg["eagle_aux_hidden_state_layer_ids"] == [0, 1, 2] and cfg["norm_before_residual"] is False
        assert "midlayer.self_attn.q_proj.weight" in keys and "embed_tokens.weight" not in keys
    else:
        assert cfg["speculators_model_type"] == "eagle3" and cfg["architectures"] == ["Eagle3Speculator"]
        assert cfg["transformer_layer_config"]["num_hidden_layers"] == 1
        assert cfg["speculators_config"]["verifier"]["name_or_path"] == "tiny"
        assert "layers.0.self_attn.q_proj.weight" in keys and not any(k.startswith("midlayer.") for k in keys)
        # the speculators package leaves a missing embed_tokens uninitialised (scripts/check_speculators.py)
        assert torch.equal(weights["embed_tokens.weight"], embedding.detach())
        with pytest.raises(ValueError, match="stores the target's input embedding"):
            export(drafter.head, tmp_path / "y", layout, verifier="tiny")
        assert not (tmp_path / "y").exists()
    assert {"fc.weight", "norm.weight", "lm_head.weight", "d2t", "t2d"} <= keys
    assert cfg["vocab_size"] if layout == SPECFORGE else cfg["transformer_layer_config"]["vocab_size"] == 96
    assert_same_drafts(model, drafter, Eagle.from_pretrained(tmp_path / "x", model, min_gain=0))


def test_specdec_checkpoints_round_trip(tmp_path):
    model = named_model("base-a", layers=3)
    drafter = Eagle(model, random_head3(model, 2, torch.arange(10, 60)), metadata={"training": {"steps": 3}})
    drafter.save_pretrained(tmp_path / "e")
    header = json.loads((tmp_path / "e" / "drafter_config.json").read_text())
    assert header["drafter"] == "eagle3" and header["config"]["aux_layers"] == [0, 1, 2]
    loaded = Eagle.from_pretrained(tmp_path / "e", model)
    assert loaded.metadata["training"] == {"steps": 3}
    assert torch.equal(loaded.head.draft_ids, torch.arange(10, 60))
    assert_same_drafts(model, drafter, loaded)
    with pytest.raises(CheckpointError, match="hidden_size=32"):
        Eagle.from_pretrained(tmp_path / "e", named_model("base-a", hidden=48, layers=3))


def test_bad_heads_are_refused(tmp_path):
    model = tiny_model("llama", layers=3).float()
    write_specforge(tmp_path / "nod2t", model, drop=("d2t",))
    with pytest.raises(CheckpointError, match="no d2t"):
        Eagle.from_pretrained(tmp_path / "nod2t", model)
    write_specforge(tmp_path / "layers", model, aux=(1, 0, 9))
    with pytest.raises(CheckpointError, match=r"aux layers must be three HF hidden-state indices in \[0, 3\]"):
        Eagle.from_pretrained(tmp_path / "layers", model)
    write_specforge(tmp_path / "ok", model)
    with pytest.raises(CheckpointError, match="vocabulary of 96 tokens but the target has 128"):
        Eagle.from_pretrained(tmp_path / "ok", tiny_model("llama", layers=3, vocab=128).float())
    with pytest.raises(CheckpointError, match="hidden size"):
        Eagle.from_pretrained(tmp_path / "ok", named_model("x", hidden=48, layers=3))
    write_specforge(tmp_path / "short", model, drop=("midlayer.hidden_norm.weight",))
    with pytest.raises(CheckpointError, match="missing"):
        Eagle.from_pretrained(tmp_path / "short", model)
    with pytest.raises(ValueError, match="pass no draft_vocab"):
        Eagle(model, random_head3(model, 0), draft_vocab=torch.arange(4))
    with pytest.raises(ValueError, match=r"aux layers must be three"):
        Eagle3Head.for_target(model, aux_layers=(0, 1, 7))


# ---- training and rescored data ------------------------------------------------------------

@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("eagle3-training")
    write_target(root / "tiny-target")
    write_prompts(root / "prompts.jsonl", 10, seed=0)
    make_data(data_args(root, "data", hidden_layers="eagle3"))
    make_data(data_args(root, "data-last"))
    return root


def test_rescoring_stores_the_targets_own_tokens_and_states(workdir):
    """--answers: another model's text, one forward, the target's greedy next token and states."""
    make_data(data_args(workdir, "rescored", answers=str(workdir / "data"), hidden_layers="0,2,1"))
    rows, source = load_examples(workdir / "rescored"), load_examples(workdir / "data")
    model = load_model(str(workdir / "tiny-target"))[0]
    for i in (0, 3):
        ids = source[i]["input_ids"]
        assert torch.equal(rows[i]["input_ids"], ids)
        with torch.no_grad():
            out = model(ids[None].long(), output_hidden_states=True)
        assert torch.equal(rows[i]["target_ids"], out.logits[0].argmax(-1).int())
        want = torch.cat([out.hidden_states[j][0] for j in (0, 2, 1)], -1)
        assert torch.allclose(rows[i]["hidden_states"].float(), want, atol=2e-2)
    manifest = json.loads((workdir / "rescored" / "manifest.json").read_text())
    assert manifest["settings"]["layers"] == [0, 2, 1] and manifest["settings"]["answers_model"].endswith("tiny-target")


def test_training_an_eagle3_head_end_to_end(workdir, capsys):
    args = train_args(workdir, workdir / "data", "run3", learning_rate=1e-2)
    directory = train(args, Eagle3Recipe(Eagle3Arguments(unroll=2, eval_depth=3, eval_topk=3, draft_vocab_size=40)))
    log = read_log(workdir / "run3")
    losses = [r["loss"] for r in log if "loss" in r]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 * 0.8
    model = load_model(str(workdir / "tiny-target"))[0]
    drafter = Eagle.from_pretrained(directory, model)
    assert drafter.head.d2t.numel() == 40 and drafter.metadata["draft_vocab"]["size"] == 40
    prompt = torch.tensor([[2, 4, 10, 3, 2, 5]])
    assert torch.equal(run(model, prompt, drafter, 20)[0], reference(model, prompt, 20))
    # the data stored the last layer's states, not the head's three
    with pytest.raises(ValueError, match=r"stores the target states of layers \[-1\]"):
        train(train_args(workdir, workdir / "data-last", "bad"), Eagle3Recipe(Eagle3Arguments()))
    assert main(["eagle3", "--model", str(workdir / "tiny-target"), "--data", str(workdir / "data"), "--output-dir",
                 str(workdir / "cli3"), "--max-steps", "2", "--batch-size", "2", "--draft-vocab-size", "30"]) == 0
    assert main(["eagle3", "--model", str(workdir / "tiny-target"), "--data", str(workdir / "data"), "--output-dir",
                 str(workdir / "cli4"), "--aux-layers", "1,x"]) == 2
    assert "--aux-layers takes three comma-separated ints" in capsys.readouterr().err


def test_a_trained_directory_is_named_on_the_command_line_and_exported(workdir, tmp_path, capsys):
    from specdec.cli import main as specdec_main
    from specdec.registry import Resources, make_drafter

    target = str(workdir / "tiny-target")
    assert main(["eagle3", "--model", target, "--data", str(workdir / "data"), "--output-dir", str(tmp_path / "run"),
                 "--max-steps", "2", "--batch-size", "2", "--draft-vocab-size", "30"]) == 0
    head_dir = tmp_path / "run" / "drafter"
    model = load_model(target)[0]
    drafter = make_drafter(f"eagle3[dir={head_dir}]+prompt-lookup", Resources(model))
    prompt = torch.tensor([[2, 4, 10, 3, 2, 5, 4, 10]])
    assert torch.equal(run(model, prompt, drafter, 16)[0], reference(model, prompt, 16))
    for layout in ("specforge", "speculators"):
        out = tmp_path / layout
        assert specdec_main(["export", "--model", target, "--kind", "eagle3", "--format", layout, "--drafter-dir",
                             str(head_dir), "--output-dir", str(out)]) == 0
        config = json.loads((out / "config.json").read_text())
        if layout == "speculators":
            assert config["speculators_config"]["verifier"]["name_or_path"] == target
            assert config["speculators_config"]["verifier"]["architectures"] == ["LlamaForCausalLM"]
        assert_same_drafts(model, Eagle.from_pretrained(head_dir, model), make_drafter(f"eagle[dir={out}]",
                                                                                         Resources(model)))
    assert specdec_main(["export", "--model", target, "--kind", "eagle3", "--format", "onnx", "--output-dir",
                         str(tmp_path / "x")]) == 2
    assert "--kind eagle3 --format speculators" in capsys.readouterr().err
    with pytest.raises(ValueError, match="dir takes a checkpoint directory"):
        make_drafter("eagle3[dir=]", Resources(model))


def test_features_stored_and_computed_agree(workdir):
    recipe = Eagle3Arguments(unroll=2, eval_depth=2, draft_vocab_size=0)
    train(train_args(workdir, workdir / "data", "s3", max_steps=2, save_steps=2), Eagle3Recipe(recipe))
    make_data(data_args(workdir, "data-none", save_hidden_states=False))
    train(train_args(workdir, workdir / "data-none", "c3", max_steps=2, save_steps=2), Eagle3Recipe(recipe))
    a = [r["loss"] for r in read_log(workdir / "s3") if "loss" in r]
    b = [r["loss"] for r in read_log(workdir / "c3") if "loss" in r]
    assert a == pytest.approx(b, rel=1e-2)


def test_frozen_parts_are_the_targets():
    model = tiny_model("llama", layers=3)
    head = Eagle3Head.for_target(model, torch.arange(7, 30), aux_layers=(0, 1, 2))
    assert torch.equal(head.lm_head.weight, model.lm_head.weight[7:30])
    assert torch.equal(head.norm.weight, model.model.norm.weight)
    assert torch.equal(FrozenTarget.of(model).embedding.weight, model.get_input_embeddings().weight)
