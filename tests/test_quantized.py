"""QuantizedDraft: a dynamic int8 copy of the target drafts for it; outputs stay exact."""

import copy

import pytest
import torch
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

from conftest import leaves_untouched, random_prompt, reference, run, tiny_model
from specdec.drafter import Context
from specdec.drafters import DraftModel, QuantizedDraft
from specdec.drafters.quantized import SCHEMES, quantized_copy
from specdec.registry import Resources, make_drafter


def fp32(arch: str):
    return copy.deepcopy(tiny_model(arch)).float()  # tiny_model's are cached and float64


def perturb(draft_copy, scale: float) -> None:
    """Adds noise to every int8 weight of `draft_copy`, so the copy disagrees with the target
    sometimes (the tiny models' int8 copies agree on every token)."""
    gen = torch.Generator().manual_seed(0)
    for m in draft_copy.modules():
        if isinstance(m, DynamicLinear):
            w = m.weight().dequantize()
            noisy = nn.Linear(m.in_features, m.out_features)
            noisy.weight.data = w + scale * w.std() * torch.randn(w.shape, generator=gen)
            noisy.qconfig = SCHEMES["int8"]
            m.set_weight_bias(DynamicLinear.from_float(noisy).weight(), m.bias())


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("options", [dict(num_tokens=4), dict(num_tokens=3, topk=2, width=2, budget=6)],
                         ids=["chain", "tree"])
def test_exact_with_rejections_at_every_depth(arch, options):
    model = fp32(arch)
    drafter = QuantizedDraft("int8", sized=False, **options)  # every depth drafted, so every depth is tried
    drafter.begin(model)
    perturb(drafter.copy, 0.3)
    rejected_at = set()
    with leaves_untouched(model):
        for seed in range(6):
            prompt = random_prompt(seed, 8)
            out, stats = run(model, prompt, drafter, 40)
            assert torch.equal(out, reference(model, prompt, 40))
            for step in stats.steps:
                depth = len(step.accepted_nodes)
                if len(step.tree) and depth < int(step.tree.depths().max()):
                    rejected_at.add(depth)  # a drafted token at depth + 1 was rejected
    assert rejected_at == set(range(options["num_tokens"]))


def test_copy_is_int8_and_shares_the_rest():
    model = fp32("qwen2")
    with leaves_untouched(model):
        q = quantized_copy(model)
        kept = quantized_copy(model, lm_head=False)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert linears and all(isinstance(q.get_submodule(n), DynamicLinear) for n in linears)
    assert q.model.embed_tokens.weight is model.model.embed_tokens.weight
    assert q.model.norm.weight is model.model.norm.weight
    assert type(kept.lm_head) is nn.Linear and kept.lm_head.weight is model.lm_head.weight
    assert not any(isinstance(m, DynamicLinear) for m in model.modules())


def test_memory_bytes():
    model = fp32("llama")
    drafter = QuantizedDraft("int8")
    assert drafter.memory_bytes == 0
    drafter.begin(model)
    expected = 0  # int8 weights, a float64 scale and an int64 zero point per row, fp32 biases
    for m in model.modules():
        if isinstance(m, nn.Linear):
            expected += m.out_features * m.in_features + 16 * m.out_features
            expected += 0 if m.bias is None else 4 * m.out_features
    assert drafter.memory_bytes == expected
    fp32_bytes = sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, nn.Linear))
    assert drafter.memory_bytes < fp32_bytes / 2


def test_draft_cache_matches_a_fresh_forward_within_rounding():
    """The activation scale is per tensor (per forward), so the incremental cache gives slightly
    different logits from a fresh forward over the same tokens; the target verifies every draft,
    so this moves acceptance only, never the output. Log-probabilities agree within 0.02."""
    model = fp32("llama")
    drafter = QuantizedDraft("int8", num_tokens=4)
    drafter.begin(model)
    perturb(drafter.copy, 0.3)
    _, stats = run(model, random_prompt(4, 9), drafter, 30)
    assert any(len(s.accepted_nodes) < len(s.tree) for s in stats.steps)  # there were rejections
    draft = drafter._draft
    held, start = draft.cached, draft.start
    assert held.numel() > 9
    nxt = torch.tensor([3])
    with torch.no_grad():
        incremental = draft._forward(nxt, torch.tensor([start + held.numel()]), None, last_only=True)[-1]
        fresh_draft = DraftModel(draft.model)
        fresh = fresh_draft._forward(torch.cat([held, nxt]), torch.arange(start, start + held.numel() + 1), None,
                                     last_only=True)[-1]
    torch.testing.assert_close(incremental, fresh, rtol=0, atol=0.02)  # seen: 0.008


def test_built_once_per_target():
    a, b = fp32("llama"), fp32("qwen2")
    drafter = QuantizedDraft("int8")
    drafter.begin(a)
    first = drafter.copy
    drafter.begin(b)
    assert drafter.copy is not first
    drafter.begin(a)
    assert drafter.copy is first


def test_refuses_float64_other_devices_and_models_without_linears():
    with pytest.raises(ValueError, match="float64.*needs a float32 target"):
        QuantizedDraft().begin(tiny_model("llama"))
    with pytest.raises(ValueError, match="on meta.*CPU-only"):
        quantized_copy(fp32("llama").to("meta"))
    with pytest.raises(ValueError, match="no nn.Linear"):
        quantized_copy(nn.Sequential(nn.Embedding(4, 4)))
    with pytest.raises(ValueError, match="unknown scheme 'int4'"):
        QuantizedDraft("int4")
    with pytest.raises(ValueError, match="num_tokens"):
        QuantizedDraft(num_tokens=0)


def test_refuses_a_torch_without_the_engine(monkeypatch):
    monkeypatch.setattr(type(torch.backends.quantized), "supported_engines", property(lambda self: ["qnnpack"]))
    with pytest.raises(RuntimeError, match="no x86 or fbgemm quantized engine.*has qnnpack"):
        quantized_copy(fp32("llama"))


def test_refuses_another_engine_and_a_copy_that_does_not_fit(monkeypatch):
    from specdec import memory

    model = fp32("llama")
    with monkeypatch.context() as m:
        m.setattr(type(torch.backends.quantized), "engine", property(lambda self: "qnnpack"))
        with pytest.raises(RuntimeError, match="engine is 'qnnpack'; set torch.backends.quantized.engine = 'x86'"):
            quantized_copy(model)
    monkeypatch.setattr(memory, "available", lambda: memory.HEADROOM + 1000)
    with pytest.raises(memory.NotEnoughMemoryError, match="QuantizedDraft's int8 copy needs"):
        quantized_copy(model)


def test_registry_name():
    model = fp32("llama")
    drafter = make_drafter("quantized-self[fp32-head,budget=4]", Resources(model))
    assert isinstance(drafter, QuantizedDraft) and not drafter.lm_head
    prompt = random_prompt(1, 6)
    out, _ = run(model, prompt, drafter, 12)
    assert torch.equal(out, reference(model, prompt, 12))


def test_copy_has_its_own_profile_key():
    """The int8 copy's forwards cost what int8 costs: it must not read (or pack by) the target's curve."""
    from specdec.profile import model_key

    model = copy.deepcopy(tiny_model()).float()
    model.name_or_path = "/models/tiny-target"
    assert model_key(quantized_copy(model)) == "tiny-target-int8.cpu.float32" != model_key(model)
    model.name_or_path, model.config.name_or_path = "", ""
    assert model_key(quantized_copy(model)) == ""  # unnamed: no stored profile, as for the target


def test_smooth_scheme_needs_calibration_and_leaves_the_target_untouched():
    model = fp32("qwen2")
    with pytest.raises(ValueError, match="'int8-smooth' needs calibration token ids"):
        quantized_copy(model, "int8-smooth")
    with leaves_untouched(model):
        q = quantized_copy(model, "int8-smooth", calibration=random_prompt(0, 12)[0])
    scaled = q.model.layers[0].mlp.down_proj
    assert scaled.out_features == model.model.layers[0].mlp.down_proj.out_features  # drafters read out_features
    assert torch.all(scaled.inv_scale > 0) and not torch.allclose(scaled.inv_scale, torch.ones(1))


def test_smooth_draft_is_built_at_the_first_proposal_and_stays_exact():
    model = fp32("llama")
    drafter = QuantizedDraft()  # int8-smooth, calibrated on the first call's committed tokens
    assert drafter.scheme == "int8-smooth"
    prompt = random_prompt(2, 10)
    out, stats = run(model, prompt, drafter, 20)
    assert torch.equal(out, reference(model, prompt, 20))
    assert isinstance(drafter.copy.lm_head.linear, DynamicLinear)
    assert stats.draft_bytes == drafter.memory_bytes > 0 and stats.peak_rss_bytes > 0
    first = drafter.copy
    run(model, random_prompt(3, 10), drafter, 5)
    assert drafter.copy is first  # kept for this target, not recalibrated


def test_draft_depth_follows_the_measured_draft_cost():
    """A draft forward a tenth of the target's drafts deeper than one 0.4 of it; one as costly as
    the target, with few drafts accepted, does not draft at all (and drifts back toward its prior)."""
    drafter = DraftModel(fp32("llama"), num_tokens=8)
    ctx = Context(random_prompt(0, 4)[0], forward_s=1.0)
    assert drafter._depth(ctx, 8) == 8  # nothing measured yet: the first proposal measures
    drafter._forward_s.add(0.1, 1)
    drafter._accept.add(18, 20)
    cheap = drafter._depth(ctx, 8)
    drafter._forward_s.add(39.6, 99)  # about 0.4 s per draft forward now
    assert 1 <= drafter._depth(ctx, 8) < cheap
    drafter._forward_s.add(1000.0, 1000)  # as costly as the target
    drafter._accept.add(0, 60)
    before = drafter._accept.rate
    assert drafter._depth(ctx, 8) == 0 and drafter._accept.rate > before


def test_a_chain_scores_its_nodes_by_the_running_acceptance():
    """Merge sizes a union by node scores: a draft chain's raw cumulative q (small on flat
    distributions even where the target agrees) would get it cut, so chains carry a ** depth."""
    model = fp32("llama")
    drafter = DraftModel(model, num_tokens=4, sized=False)
    prompt = random_prompt(1, 8)
    run(model, prompt, drafter, 12)
    tree = drafter.propose(Context(prompt[0]))
    a = drafter._accept.rate
    assert a > 0.9  # the model drafting for itself is always right
    torch.testing.assert_close(tree.scores, a ** torch.arange(1, 5, dtype=torch.float64))
