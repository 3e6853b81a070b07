"""The packed-linear fast path and the verify cost profile, on tiny in-process models."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import specdec
from conftest import random_prompt, reference, tiny_model
from helpers import random_head, random_heads
from specdec import profile
from specdec.drafters import DraftModel, Eagle, Medusa, PromptLookup
from specdec.drafters.vocab import PackedDraft
from specdec.packing import DEFAULT_PACKED_FROM, PackedLinears, PackedRoute, Packing, available, packed_linears

pytestmark = pytest.mark.skipif(not available(), reason="this torch build has no oneDNN linear packing")


def fp32_model(seed: int = 0, arch: str = "llama"):
    return copy.deepcopy(tiny_model(arch, seed=seed)).float()


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


class OneDnnSpy(torch.overrides.TorchFunctionMode):
    """Counts oneDNN linear calls made under it."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += func is torch.ops.mkldnn._linear_pointwise
        return func(*args, **(kwargs or {}))


def test_packed_forward_matches_stock_and_leaves_the_model_alone():
    model = fp32_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    attrs = set(vars(model))
    packs = PackedLinears(model)
    assert packs.enabled
    ids = random_prompt(1, 12)
    with packs:
        out = logits(model, ids)
        routed = [packs.lookup(m.weight) is not None for m in model.modules() if isinstance(m, torch.nn.Linear)]
    torch.testing.assert_close(out, logits(model, ids), rtol=1e-5, atol=1e-5)
    assert all(routed)
    assert set(vars(model)) == attrs and not model._forward_hooks and not model._forward_pre_hooks
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_packed_route_is_used_and_ends_with_the_block():
    model = fp32_model()
    packs = PackedLinears(model)
    ids = random_prompt(2, 5)
    with OneDnnSpy() as spy:
        with packs:
            logits(model, ids)
        n_inside = spy.calls
        logits(model, ids)
    n_linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert n_inside == n_linears
    assert spy.calls == n_inside  # nothing routed once the block ended


def test_in_place_weight_change_repacks():
    model = fp32_model(seed=3)
    packs = PackedLinears(model)
    ids = random_prompt(3, 6)
    with torch.no_grad():
        model.lm_head.weight.mul_(2.0)
    with packs:
        out = logits(model, ids)
    torch.testing.assert_close(out, logits(model, ids), rtol=1e-5, atol=1e-5)


def test_grad_and_float64_fall_through():
    model = fp32_model()
    packs = PackedLinears(model)
    ids = random_prompt(4, 6)
    with packs:
        loss = model(input_ids=ids).logits.sum()  # autograd on: the stock linear runs
    loss.backward()
    assert model.lm_head.weight.grad is not None
    assert not PackedLinears(tiny_model()).enabled  # float64 weights: nothing to pack, a no-op


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_generate_with_packed_verify_matches_model_generate(arch):
    model = fp32_model(seed=5, arch=arch)
    prompt = random_prompt(5, 24)
    ref = reference(model, prompt, 20)
    drafter = PromptLookup(min_ngram=1)
    stats = specdec.GenerationStats()
    out = specdec.generate(model, prompt, drafter, max_new_tokens=20, packed_from=1, stats=stats)
    assert torch.equal(out, ref)
    assert packed_linears(model).enabled


def test_packed_route_picks_by_token_count():
    model = fp32_model()
    route = PackedRoute(model, 4)
    assert route(4) is packed_linears(model) and route(16) is packed_linears(model)
    assert not isinstance(route(3), PackedLinears) and not isinstance(PackedRoute(model, None)(64), PackedLinears)


def test_draft_model_forwards_follow_the_runtime_and_stay_exact():
    """The draft model's forwards pack as generate's `packed_from` says (None: every forward stock,
    the drafter's too; "auto": the draft model's own crossover), with no drafter argument."""
    target, draft = fp32_model(seed=6), fp32_model(seed=7)
    prompt = random_prompt(6, 20)
    ref = reference(target, prompt, 16)
    for packed_from, packs_from in ((1, 1), (None, None), ("auto", DEFAULT_PACKED_FROM)):  # no stored profile
        drafter = DraftModel(draft, num_tokens=3)
        out = specdec.generate(target, prompt, drafter, max_new_tokens=16, packed_from=packed_from)
        assert torch.equal(out, ref)
        assert drafter._route.packed_from == packs_from
        assert isinstance(drafter._route(packs_from or 64), PackedLinears) == (packs_from is not None)


def head_drafter(kind: str, model, draft_vocab):
    if kind == "eagle":
        return Eagle(model, random_head(model, 1), draft_vocab=draft_vocab, min_gain=0)
    return Medusa(model, random_heads(model, 1), tree="medusa-16", draft_vocab=draft_vocab)


def spied(drafter, spy: OneDnnSpy):
    """`drafter` with its proposals (its own forwards only, not the verifier's) under `spy`."""
    propose = drafter.propose

    def spied_propose(ctx):
        with spy:
            return propose(ctx)

    drafter.propose = spied_propose
    return drafter


@pytest.mark.parametrize("kind", ["eagle", "medusa"])
@pytest.mark.parametrize("vocab", [None, torch.arange(0, 96, 3)])
def test_head_drafters_run_packed_and_stay_exact(kind, vocab):
    """Eagle's and Medusa's draft forwards go through oneDNN when the runtime says so (generate's
    packed_from: 1 packs every forward, None none), at least once per draft, and stay exact."""
    model = fp32_model(seed=8)
    prompt = random_prompt(8, 20)
    ref = reference(model, prompt, 16)
    calls, forwards = {}, {}
    for packed_from in (1, None):
        spy = OneDnnSpy()
        drafter = spied(head_drafter(kind, model, vocab), spy)
        stats = specdec.GenerationStats()
        out = specdec.generate(
            model, prompt, drafter, max_new_tokens=16, packed_from=packed_from, guard=None, stats=stats
        )
        assert torch.equal(out, ref)
        calls[packed_from], forwards[packed_from] = spy.calls, stats.target_forwards
    assert calls[None] == 0 and calls[1] >= forwards[1] - 1  # at least one oneDNN call per draft


@torch.no_grad()  # as drafting runs: the route leaves autograd to the stock path
def test_packed_draft_routes_the_fixed_rows_not_the_context_block_or_every_row():
    model = fp32_model(seed=9)
    x = torch.randn(2, model.config.hidden_size)
    drafter = head_drafter("medusa", model, torch.arange(0, 96, 2))
    vocab = drafter._vocab
    route = PackedDraft(drafter.heads, vocab, 1)
    with OneDnnSpy() as spy, route(2):
        vocab.logits(x)
    assert spy.calls == 1
    vocab.admit(torch.tensor([1, 3]))  # context tokens outside the fixed ids: a second block, stock
    with OneDnnSpy() as spy, route(2):
        assert vocab.logits(x).shape == (2, 48 + 2)
    assert spy.calls == 1
    every = head_drafter("medusa", model, None)  # every row: the target's lm_head, not copied
    with OneDnnSpy() as spy, PackedDraft(every.heads, every._vocab, 1)(2):
        every._vocab.logits(x)
    assert spy.calls == 0


def test_head_drafters_pack_lazily_and_once():
    """No packing before the first draft; a second request on the same target keeps the packed
    copies, another target gets its own."""
    model = fp32_model(seed=9)
    drafter = head_drafter("eagle", model, torch.arange(0, 96, 2))
    assert drafter._route._route is None
    packed, routes = [], []
    for seed in (9, 10):  # two requests on the same target
        specdec.generate(model, random_prompt(seed, 8), drafter, max_new_tokens=4, packed_from=1, guard=None)
        routes.append(drafter._route)
        packed.append(drafter._route._route)
        assert packed[-1] is not None and packed[-1]._packs.enabled
    assert routes[0] is routes[1] and packed[0] is packed[1]
    other = fp32_model(seed=10)
    specdec.generate(other, random_prompt(9, 8), drafter, max_new_tokens=4, packed_from=1, guard=None)
    assert drafter._route is not routes[0] and drafter._route.parts[1] is drafter._vocab


def test_packing_that_does_not_fit_in_memory_is_skipped_and_said(monkeypatch, caplog):
    """Where the packed copy would not fit in the memory available, the model keeps its stock
    forward (exact, slower) and one warning says what packing needs; unknown memory packs as before."""
    from specdec import memory

    model = fp32_model(seed=8)
    needed = sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, torch.nn.Linear))
    monkeypatch.setattr(memory, "available", lambda: needed // 2)
    packs = PackedLinears(model)
    assert not packs.enabled
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "pack" in said[0] and memory.size(needed) in said[0], said
    prompt = random_prompt(8, 20)
    drafter = head_drafter("medusa", model, None)  # its heads are not packed either
    with OneDnnSpy() as spy:
        out = specdec.generate(model, prompt, drafter, max_new_tokens=16, packed_from=1, guard=None)
    assert torch.equal(out, reference(model, prompt, 16)) and spy.calls == 0
    monkeypatch.setattr(memory, "available", lambda: None)  # not known here: packs as before
    assert PackedLinears(model).enabled


def test_weight_copies_that_do_not_fit_in_memory_are_refused(monkeypatch, tmp_path):
    """A draft vocabulary's lm_head rows and a Medusa-2 target's merged copy are required copies:
    refused with what they need, before anything is copied."""
    import json

    from specdec import memory
    from specdec.drafters.medusa import adapted_target

    model = fp32_model(seed=8)
    monkeypatch.setattr(memory, "available", lambda: 1 << 20)
    rows = 96 * model.config.hidden_size * 4
    for kind in ("eagle", "medusa"):
        with pytest.raises(memory.NotEnoughMemoryError, match=f"draft_vocab.*{memory.size(rows)}.*1.0 MiB"):
            head_drafter(kind, model, torch.arange(96))
    head_drafter("medusa", model, None).save_pretrained(tmp_path / "m")
    header = json.loads((tmp_path / "m" / "drafter_config.json").read_text())
    header["metadata"]["backbone"] = {"lora": {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]},
                                      "fingerprint": [0.0, 0.0]}
    (tmp_path / "m" / "drafter_config.json").write_text(json.dumps(header))
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    with pytest.raises(memory.NotEnoughMemoryError, match=f"adapted_target.*{memory.size(params)}"):
        adapted_target(tmp_path / "m", model)


def test_packed_from_is_validated():
    model = fp32_model()
    with pytest.raises(ValueError, match="packed_from"):
        specdec.generate(model, random_prompt(0, 4), max_new_tokens=2, packed_from=0)
    with pytest.raises(ValueError, match="packed_from"):
        specdec.generate(model, random_prompt(0, 4), max_new_tokens=2, packed_from="fast")
    with pytest.raises(ValueError, match="packed_from"):  # bool is an int subclass, not a token count
        specdec.generate(model, random_prompt(0, 4), max_new_tokens=2, packed_from=True)


def test_measure_restores_the_cache_and_profile_round_trips(tmp_path):
    model = fp32_model()
    prof = profile.profile(model, "tiny", ks=(1, 2, 4), context=8, repeats=1)
    assert prof.stock.method == "stock" and prof.packed.method == "packed"
    assert prof.stock.ks == (1, 2, 4) and all(s > 0 for s in prof.stock.seconds + prof.packed.seconds)
    path = profile.profile_path(tmp_path, "some/model")
    profile.save(prof, path)
    assert profile.load(path) == prof
    assert not list(path.parent.glob("*.tmp"))


def curve(method, seconds, ks=(1, 2, 4, 8)):
    return profile.CostCurve("m", method, ks, tuple(seconds), 300, 2, profile.machine_id())


def test_forward_cost_follows_the_route_and_never_decreases():
    prof = profile.Profile(curve("stock", [1.0, 1.1, 2.0, 3.0]), curve("packed", [1.1, 0.8, 1.3, 1.5]))
    cost = prof.forward_cost(packed_from=2)
    assert [cost(k) for k in (1, 2, 4, 8)] == [1.0, 1.0, 1.3, 1.5]  # the packed dip at k=2 is not trusted
    assert cost(3) == pytest.approx(1.05) and cost(16) == pytest.approx(3.0)  # interpolated, extrapolated
    stock_only = prof.forward_cost(packed_from=None)
    assert [stock_only(k) for k in (1, 2, 4, 8)] == [1.0, 1.1, 2.0, 3.0]
    ks = range(1, 40)
    assert all(cost(a) <= cost(b) for a, b in zip(ks, ks[1:]))


def test_generate_hands_drafters_the_stored_curve(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path))
    model = copy.deepcopy(fp32_model())
    model.name_or_path = str(tmp_path / "tiny-model")
    prof = profile.Profile(curve("stock", [1.0, 1.5, 2.0, 3.0]), None)
    profile.save(prof, profile.profile_path(tmp_path, profile.model_key(model)))
    seen = []

    class Spy(PromptLookup):
        def propose(self, ctx):
            seen.append(ctx.verify_cost)
            return super().propose(ctx)

    prompt = random_prompt(8, 16)
    out = specdec.generate(model, prompt, Spy(min_ngram=1), max_new_tokens=6)
    assert torch.equal(out, reference(model, prompt, 6))
    assert seen and seen[0](0) == 1.0 and seen[0](3) == pytest.approx(2.0)  # 3 drafts + root = 4 tokens


def test_packed_from_is_the_crossover_that_holds_for_every_larger_k():
    stock = curve("stock", [1.0, 1.1, 2.0, 3.0])
    assert profile.Profile(stock, curve("packed", [1.1, 1.2, 1.3, 1.5])).packed_from == 4
    assert profile.Profile(stock, curve("packed", [0.9, 1.0, 1.3, 1.5])).packed_from == 1
    assert profile.Profile(stock, curve("packed", [1.1, 1.0, 1.3, 3.5])).packed_from is None
    assert profile.Profile(stock, None).packed_from is None


def test_cost_interpolates_and_extrapolates():
    c = curve("stock", [1.0, 2.0, 2.0, 4.0])
    assert c.cost(3) == 2.0 and c.cost(6) == 3.0 and c.cost(16) == 8.0 and c.relative(2) == 2.0


def test_stored_profile_is_per_machine(tmp_path):
    model = fp32_model()
    prof = profile.Profile(curve("stock", [1.0, 1.1, 2.0, 3.0]), curve("packed", [1.1, 1.2, 1.3, 1.5]))
    assert profile.stored(model, tmp_path) is None
    model = copy.deepcopy(model)
    model.name_or_path = str(tmp_path / "tiny-model")  # what from_pretrained records
    profile.save(prof, profile.profile_path(tmp_path, profile.model_key(model)))
    assert profile.stored(model, tmp_path) == prof
    assert profile.crossover(model, tmp_path) == prof.packed_from == 4  # "auto" takes the stored crossover

    other = dataclasses.replace(prof.stock, machine="another machine")
    profile.save(profile.Profile(other, prof.packed), profile.profile_path(tmp_path, profile.model_key(model)))
    assert profile.stored(model, tmp_path) is None
    assert profile.crossover(model, tmp_path) == DEFAULT_PACKED_FROM  # another machine's: the default
    assert Packing(6).packed_from(model) == 6 and Packing(None).packed_from(model) is None
    assert profile.packing("auto", tmp_path).packed_from(model) == DEFAULT_PACKED_FROM


def test_measure_rejects_bad_arguments():
    with pytest.raises(ValueError):
        profile.measure(fp32_model(), "tiny", ks=(0, 1))


def test_bench_packed_from_option():
    from specdec.bench import parse_packed_from

    assert parse_packed_from("auto") == "auto" and parse_packed_from("none") is None and parse_packed_from("4") == 4
    for bad in ("fast", "0", "-1"):
        with pytest.raises(ValueError, match="--packed-from"):
            parse_packed_from(bad)


def test_no_drafter_decides_packing():
    """Packing is the runtime's: no drafter module imports the decode loop, no drafter takes a
    crossover argument; they get routes from `Context.packing`."""
    import ast
    import inspect
    from pathlib import Path

    import specdec.drafters as drafters

    for path in sorted(Path(drafters.__file__).parent.glob("*.py")):
        tree = ast.parse(path.read_text())
        imported = {f"{n.module}.{a.name}" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
        imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert "specdec.decode" not in imported, path.name
    classes = [
        c for c in vars(drafters).values() if inspect.isclass(c) and hasattr(c, "propose") and hasattr(c, "begin")
    ]
    assert {"Eagle", "Medusa", "DraftModel", "LayerSkip", "EarlyExit"} <= {c.__name__ for c in classes}
    for cls in classes:
        assert not {"packed_from", "crossover"} & set(inspect.signature(cls).parameters), cls.__name__
