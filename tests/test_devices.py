"""Device-clean specdec, checked without a GPU.

- `--device` / `--dtype` parsing and the CLI's one-line errors (before any model loads);
- profiles keyed by device and dtype, and the short curve measured on first use off the CPU;
- packing switching itself off for a model that is not on the CPU: torch's "meta" device is a
  real non-CPU device (no data, shapes only), so the code takes exactly the path it takes on CUDA;
- placement: every input the verifier, `specdec profile` and the model drafters feed a meta model
  is on the model's device, checked by a torch-function mode that refuses any op mixing devices
  (what CUDA refuses or silently copies);
- host reads: no proposal or greedy step brings a [.., vocab] tensor to the host;
- timing: `GenerationStats` and `profile.measure` read their clocks through `devices.sync`.
What needs a real GPU (CUDA kernels, real asynchrony) runs in the device-parametrised tests
(`device` fixture) where CUDA is available.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

import specdec
from conftest import VOCAB, random_prompt, reference, run, tiny_model
from specdec import devices, packing, profile
from specdec.cli import main
from specdec.drafters import DraftModel, Medusa, PromptLookup
from specdec.drafters.layer_view import LayerSubset
from specdec.drafters.medusa import MedusaHeads
from specdec.drafters.vocab import DraftVocab, PackedDraft
from specdec.packing import DEFAULT_PACKED_FROM
from specdec.trees import TokenTree
from specdec.verifier import Verifier


def named(model, name: str = "tiny-model"):
    """A copy of `model` with the source name `from_pretrained` records (profiles are keyed by it)."""
    model = copy.deepcopy(model)
    model.name_or_path = name
    return model


def on_meta(model):
    return copy.deepcopy(model).to("meta")


# ---- options ---------------------------------------------------------------------------------


def test_parse_device_and_dtype():
    assert devices.parse_device("cpu") == torch.device("cpu")
    assert devices.parse_dtype("bf16") is torch.bfloat16 and devices.parse_dtype("float32") is torch.float32
    for bad in ("gpu", "", "cuda:x"):
        with pytest.raises(ValueError, match="--device .*not a device"):
            devices.parse_device(bad)
    with pytest.raises(ValueError, match="--device meta: specdec runs on cpu or cuda"):
        devices.parse_device("meta")
    with pytest.raises(ValueError, match="--dtype 'int8': choose one of float32"):
        devices.parse_dtype("int8")
    if torch.cuda.is_available():
        assert devices.parse_device("cuda").type == "cuda"
        with pytest.raises(ValueError, match="there are"):
            devices.parse_device(f"cuda:{torch.cuda.device_count()}")
    else:
        with pytest.raises(ValueError, match="--device cuda: CUDA is not available .*use --device cpu"):
            devices.parse_device("cuda")


@pytest.mark.parametrize("argv", [
    ["generate", "--device", "gpu", "hi"],
    ["generate", "--dtype", "int8", "hi"],
    ["profile", "--device", "tpu:0"],
    ["bench", "--dtype", "half-ish"],
    ["demo", "--device", "meta"],
], ids=["generate-device", "generate-dtype", "profile", "bench", "demo"])
def test_cli_refuses_bad_placement_in_one_line(argv, capsys, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the options were checked")

    monkeypatch.setattr("specdec.models.load_model", no_loading)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"specdec: error: {argv[1]} ")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cli_refuses_cuda_where_there_is_none(capsys):
    assert main(["generate", "--device", "cuda", "hi"]) == 2
    assert "specdec: error: --device cuda: CUDA is not available" in capsys.readouterr().err


# ---- profiles --------------------------------------------------------------------------------


def curve(machine: str, key: str = "m"):
    return profile.CostCurve(key, "stock", (1, 2, 4), (1.0, 1.2, 1.5), 300, 2, machine)


def test_profile_key_differs_by_device_and_dtype(tmp_path):
    cpu64 = named(tiny_model("llama"))
    cpu32, meta = named(tiny_model("llama")).float(), on_meta(cpu64)
    keys = {profile.model_key(m) for m in (cpu64, cpu32, meta)}
    assert keys == {"tiny-model.cpu.float64", "tiny-model.cpu.float32", "tiny-model.meta.float64"}
    assert profile.model_key(tiny_model("llama")) == ""  # no source name: nothing stored
    prof = profile.Profile(curve(profile.machine_id()), None)
    profile.save(prof, profile.profile_path(tmp_path, profile.model_key(cpu64)))
    assert profile.stored(cpu64, tmp_path) == prof
    assert profile.stored(cpu32, tmp_path) is None and profile.stored(meta, tmp_path) is None
    # The same file name under another device's key is still refused: its machine is the CPU's.
    profile.save(prof, profile.profile_path(tmp_path, profile.model_key(meta)))
    assert profile.stored(meta, tmp_path) is None


def test_machine_id_names_the_accelerator(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some GPU 80GB")
    cpu, gpu = profile.machine_id("cpu"), profile.machine_id("cuda")
    assert cpu != gpu and gpu.startswith("Some GPU 80GB (cuda) on ") and gpu.endswith(cpu)


def test_first_use_measures_everywhere_unless_opted_out(monkeypatch):
    monkeypatch.setenv("SPECDEC_TUNE", "1")
    assert profile.measures_on_first_use(torch.device("cuda"))
    assert profile.measures_on_first_use(torch.device("cpu"))
    assert not profile.measures_on_first_use(torch.device("meta"))  # nothing runs there to time
    monkeypatch.setenv("SPECDEC_TUNE", "0")  # the opt-out (tests take it: conftest)
    assert not profile.measures_on_first_use(torch.device("cpu"))
    assert not profile.measures_on_first_use(torch.device("cuda"))


def count_measures(monkeypatch) -> list:
    calls = []
    real = profile.measure

    def spy(model, name, **kwargs):
        calls.append(kwargs)
        return real(model, name, **kwargs)

    monkeypatch.setattr(profile, "measure", spy)
    return calls


def test_first_use_measures_a_short_curve_once_and_stores_it(tmp_path, monkeypatch):
    calls = count_measures(monkeypatch)
    model = named(tiny_model("llama"))
    assert profile.for_model(model, tmp_path) is None and not calls  # SPECDEC_TUNE=0 (conftest): not measured
    prof = profile.for_model(model, tmp_path, first_use=True)
    assert len(calls) == 1 and {k: calls[0][k] for k in profile.FIRST_USE} == profile.FIRST_USE  # float64: stock only
    assert prof.packed is None and prof.stock.ks == profile.FIRST_USE["ks"] and min(prof.stock.seconds) > 0
    assert profile.stored(model, tmp_path) == prof  # written under the model's device/dtype key
    assert profile.for_model(model, tmp_path, first_use=True) == prof and len(calls) == 1
    anonymous = tiny_model("llama", seed=5)  # no key: measured once in this process, nothing written
    first = profile.for_model(anonymous, tmp_path, first_use=True)
    assert profile.for_model(anonymous, tmp_path, first_use=True) is first and len(calls) == 2
    assert sorted(p.name for p in (tmp_path / "profiles").iterdir()) == ["tiny-model.cpu.float64.json"]


def test_generate_sizes_trees_with_a_first_use_curve(tmp_path, monkeypatch):
    """With first use on (as off the CPU), a drafter gets a measured curve, not None."""
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path))
    monkeypatch.setattr(profile, "measures_on_first_use", lambda device: True)
    seen = []

    class Spy(PromptLookup):
        def propose(self, ctx):
            seen.append(ctx.verify_cost)
            return super().propose(ctx)

    model = named(tiny_model("llama", seed=2))
    prompt = random_prompt(8, 16)
    out, _ = run(model, prompt, Spy(min_ngram=1), 6)
    assert torch.equal(out, reference(model, prompt, 6))
    assert seen and seen[0] is not None and seen[0](0) == 1.0 and seen[0](63) >= 1.0
    assert profile.stored(model, tmp_path) is not None


def test_first_api_call_tunes_itself_and_says_so_once(tmp_path, monkeypatch, caplog, capsys):
    """What a new user gets (no `specdec profile` run, SPECDEC_TUNE unset): the first
    `specdec.generate` measures a short profile, with one notice and a progress bar, and stores
    it; the next call finds it and is silent. SPECDEC_TUNE=0 measures nothing."""
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path))
    monkeypatch.delenv("SPECDEC_TUNE")
    calls = count_measures(monkeypatch)
    model, prompt = named(tiny_model("llama", seed=3), "fresh-model"), random_prompt(3, 16)
    for turn in range(2):
        caplog.clear()
        out = specdec.generate(model, prompt, PromptLookup(min_ngram=1), max_new_tokens=6)
        assert torch.equal(out, reference(model, prompt, 6))
        notices = [r.getMessage() for r in caplog.records if r.name == "specdec.profile"]
        err = capsys.readouterr().err
        if turn == 0:
            assert len(notices) == 1 and "SPECDEC_TUNE=0" in notices[0] and "fresh-model" in notices[0], notices
            assert "forward, k" in err and len(calls) == 1  # the progress bar; float64: one (stock) curve
            assert profile.stored(model, tmp_path) is not None
        else:
            assert notices == [] and "forward, k" not in err and len(calls) == 1
    monkeypatch.setenv("SPECDEC_TUNE", "0")
    other = named(tiny_model("llama", seed=4), "opted-out-model")
    specdec.generate(other, prompt, PromptLookup(min_ngram=1), max_new_tokens=4)
    assert len(calls) == 1 and profile.stored(other, tmp_path) is None


# ---- packing ---------------------------------------------------------------------------------


def test_packing_switches_itself_off_off_the_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path))  # no stored profile: "auto" decides alone
    cpu = copy.deepcopy(tiny_model("llama")).float()  # fp32 on the CPU: packable, so the meta half can fail
    meta = on_meta(cpu)
    if not packing.available():
        pytest.skip("this torch build has no oneDNN linear packing")
    assert packing.packable(cpu) and packing.PackedLinears(cpu).enabled
    assert profile.crossover(cpu, tmp_path) == DEFAULT_PACKED_FROM
    assert not packing.packable(meta) and not packing.PackedLinears(meta).enabled
    assert profile.crossover(meta, tmp_path) is None
    packed_calls = []
    monkeypatch.setattr(packing._Route, "__torch_function__", lambda *a, **k: packed_calls.append(a))
    # A route asked to pack every forward, and a head drafter's route over the same weights:
    # entering them on a meta model installs nothing, and a forward runs the stock path.
    route = packing.PackedRoute(meta, 1)
    heads = MedusaHeads(32, 2).float().to("meta")
    vocab = DraftVocab(meta.get_output_embeddings().weight, None, torch.arange(10), "test")
    head_route = PackedDraft(heads, vocab, 1)
    with route(8), head_route(8):
        logits = meta(input_ids=torch.zeros(1, 8, dtype=torch.long, device="meta")).logits
    assert logits.device.type == "meta" and not packed_calls
    assert not route._packs.enabled and not head_route._route._packs.enabled


# ---- placement on a non-CPU device -------------------------------------------------------------


class SameDevice(TorchFunctionMode):
    """Refuses any torch call whose tensors are on two devices (a 0-dim CPU scalar excepted, which
    every device accepts): what CUDA refuses, or copies behind the caller's back."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        seen = {t.device for t in tree_flatten((args, kwargs))[0]
                if isinstance(t, torch.Tensor) and not (t.device.type == "cpu" and t.dim() == 0)}
        assert len(seen) <= 1, f"{getattr(func, '__name__', func)} mixes devices {seen}"
        return func(*args, **kwargs)


def test_same_device_mode_catches_a_host_tensor_fed_to_the_model():
    meta = on_meta(tiny_model("llama"))
    with pytest.raises(AssertionError, match="mixes devices"), SameDevice():
        meta(input_ids=torch.tensor([[1, 2, 3]]))  # the embedding alone would not notice


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_the_verifier_feeds_the_model_on_its_device(attn):
    meta = on_meta(tiny_model("llama", attn=attn))
    tree = TokenTree(torch.tensor([5, 9, 6, 7]), torch.tensor([-1, -1, 1, 2]))
    prompt = random_prompt(2, 6)[0]
    with SameDevice():
        verifier = Verifier(meta, keep_hidden_states=True)
        verifier.prefill(prompt)
        scores = verifier.score(int(prompt[-1]), tree)
        verifier.commit([1, 2])  # a branch: kv.keep's index goes to the cache's device
        verifier.score(7, TokenTree.chain([3, 4]))  # a chain: no mask
    assert scores.logits.device.type == "meta" and scores.hidden_states.device.type == "meta"
    assert verifier.prefix_len == 8


def test_profile_measure_feeds_the_model_on_its_device():
    meta = on_meta(tiny_model("llama"))
    with SameDevice():
        c = profile.measure(meta, "tiny", ks=(1, 3), context=5, repeats=1)
    assert c.method == "stock" and "(meta)" in c.machine


def test_model_drafters_feed_their_models_on_their_device():
    """The forwards of the draft model and of a layer subset (LayerSkip, EarlyExit), with the host
    ids, positions and tree masks that `cached_drafting` hands them."""
    meta = on_meta(tiny_model("llama", layers=3))
    tree = TokenTree(torch.tensor([5, 9, 6]), torch.tensor([-1, -1, 1]))
    from specdec.trees import tree_mask

    with SameDevice():
        drafter = DraftModel(meta)
        drafter.begin(meta)
        first = drafter._forward(torch.tensor([1, 2, 3]), torch.arange(3), None, True)  # 3 cached
        mask = tree_mask(tree, torch.tensor([0, 1]), 0, 3, meta.dtype)  # two siblings after them
        more = drafter._forward(tree.tokens[:2], torch.tensor([3, 3]), mask)
        view = LayerSubset(meta, [0, 2])
        out = view(torch.tensor([1, 2, 3]), torch.arange(3), cache=view.new_cache(), return_states=True)
    assert first.shape == (1, VOCAB) and more.shape == (2, VOCAB) and first.device.type == "meta"
    assert out.logits.device.type == "meta" and out.states.shape[0] == 3


# ---- host reads --------------------------------------------------------------------------------


class HostReads(TorchFunctionMode):
    """Records the shape of every tensor read on the host (.cpu(), .tolist(), .item(), .numpy(),
    int/float/bool of a tensor)."""

    READS = {"cpu", "tolist", "item", "numpy", "__int__", "__float__", "__bool__"}

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", None) in self.READS and args and isinstance(args[0], torch.Tensor):
            self.shapes.append(tuple(args[0].shape))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("make", [
    lambda m: DraftModel(tiny_model("llama", seed=1, layers=1), topk=3, width=3, num_tokens=3),
    lambda m: Medusa(m, MedusaHeads(32, 3).double(), tree="medusa-16"),
    lambda m: None,
], ids=["draft-model-tree", "medusa", "plain"])
def test_no_step_reads_a_vocabulary_row_on_the_host(make):
    """Drafters and the greedy rule read top-k values and argmaxes, never [.., vocab] rows: on
    CUDA each such read is a wait for the device and a copy of the whole row."""
    model = tiny_model("llama")
    prompt = random_prompt(4, 9)
    drafter, reads = make(model), HostReads()
    with reads:
        out, stats = run(model, prompt, drafter, 8)
    assert torch.equal(out, reference(model, prompt, 8))
    assert reads.shapes and not [s for s in reads.shapes if s and s[-1] == VOCAB]
    assert drafter is None or any(len(s.tree) for s in stats.steps)


# ---- timing --------------------------------------------------------------------------------------


def spy_sync(monkeypatch) -> list:
    calls = []
    monkeypatch.setattr(devices, "sync", lambda device: calls.append(torch.device(device)))
    return calls


def test_generation_stats_time_with_the_device_synchronised(monkeypatch):
    calls = spy_sync(monkeypatch)
    model = tiny_model("llama")
    prompt = torch.cat([random_prompt(1, 8)] * 3, dim=1)
    out, stats = run(model, prompt, PromptLookup(), 10)
    assert torch.equal(out, reference(model, prompt, 10))
    # the prefill's two ends, then every step's four clock reads (start, drafted, verified, end)
    assert len(calls) == 2 + 4 * stats.target_forwards and set(calls) == {model.device}


def test_profile_measure_times_with_the_device_synchronised(monkeypatch):
    calls = spy_sync(monkeypatch)
    model = tiny_model("llama")
    profile.measure(model, "tiny", ks=(1, 2, 4), context=6, repeats=2)
    assert len(calls) == 3 * (2 + 1) * 2 and set(calls) == {model.device}  # both ends of every forward


def test_sync_is_a_no_op_on_the_cpu_and_meta(monkeypatch):
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: pytest.fail("synchronised CUDA"))
    devices.sync("cpu")
    devices.sync(torch.device("meta"))
    assert devices.clock("cpu") <= devices.clock("cpu")


def test_public_generate_returns_on_the_callers_device(device):
    model = tiny_model("llama", device=device)
    host_prompt = random_prompt(0, 5)
    assert specdec.generate(model, host_prompt, max_new_tokens=3).device == host_prompt.device
    assert specdec.generate(model, host_prompt.to(device), max_new_tokens=3).device == model.device


def test_a_drafter_refuses_before_the_first_use_measurement(tmp_path, monkeypatch):
    """`begin` runs before the first-use curve: a drafter that cannot serve this target refuses at
    once instead of after a measurement (QuantizedDraft refuses a float64 target)."""
    from specdec.drafters import QuantizedDraft

    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path))
    monkeypatch.delenv("SPECDEC_TUNE")
    calls = count_measures(monkeypatch)
    model = named(tiny_model("llama", seed=5), "refusing-model")
    with pytest.raises(ValueError, match="float32"):
        specdec.generate(model, random_prompt(5, 8), QuantizedDraft(), max_new_tokens=4)
    assert calls == [] and profile.stored(model, tmp_path) is None
