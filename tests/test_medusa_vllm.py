"""Medusa heads in vLLM's layout (and FasterDecoding's): hand-written checkpoints load and draft what
vLLM would compute from them, `export_medusa_vllm` round-trips, bad checkpoints are refused,
and `specdec export`.

`vllm_logits` restates vLLM's Medusa forward from its published layout (blocks.{h}.layers.{l},
SiLU residual, lm_heads.{h} or one lm_head with original_lm_head, token_map -> -inf elsewhere),
independently of `specdec.drafters.medusa_formats`."""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import specdec.models
from conftest import random_prompt, reference, run, tiny_model
from helpers import K, assert_same_drafts, named_model, random_heads
from specdec import cli
from specdec.drafters import checkpoint
from specdec.drafters.checkpoint import CheckpointError
from specdec.drafters.medusa import Medusa, lm_head_of
from specdec.drafters.medusa_formats import export_medusa_vllm
from specdec.drafters.vocab import DraftVocab

LAYERS = 2
ACCURACY = [[0.5, 0.2, 0.1], [0.4, 0.2, 0.1], [0.3, 0.2, 0.1]]


def write_vllm(
    directory,
    model,
    seed: int,
    *,
    original: bool = False,
    fc_bias: bool = True,
    token_map=None,
    full_rows: bool = False,
    drop: tuple[str, ...] = (),
    **config,
) -> dict:
    """A vLLM Medusa checkpoint for `model`, written key by key from the published names: K heads
    of LAYERS random blocks; `original`: one lm_head, the target's (its `token_map` rows, or all
    of them with `full_rows`), else random own lm_heads. `drop`: keys left out; `config`: fields
    overridden. Returns the tensors written: float32 (specdec builds heads in float32 before
    casting them to the target's dtype), the target's lm_head in its own dtype."""
    hidden, vocab = model.config.hidden_size, model.get_output_embeddings().out_features
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for h in range(K):
        for i in range(LAYERS):
            tensors[f"blocks.{h}.layers.{i}.weight"] = torch.randn(hidden, hidden, generator=g) / 3
            if fc_bias:
                tensors[f"blocks.{h}.layers.{i}.bias"] = torch.randn(hidden, generator=g) / 3
        if not original:
            tensors[f"lm_heads.{h}.weight"] = torch.randn(vocab, hidden, generator=g)
    weight = model.get_output_embeddings().weight.detach()
    if original:
        tensors["lm_heads.0.weight"] = weight.clone() if token_map is None or full_rows else weight[token_map].clone()
    if token_map is not None:
        tensors["token_map"] = token_map
    cfg = {
        "model_type": "medusa",
        "architectures": ["MedusaModel"],
        "hidden_size": hidden,
        "vocab_size": vocab,
        "num_heads": K,
        "num_hidden_layers": LAYERS,
        "truncated_vocab_size": vocab if token_map is None else token_map.numel(),
        "original_lm_head": original,
        "medusa_fc_bias": fc_bias,
        **config,
    }
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(cfg))
    save_file({k: v for k, v in tensors.items() if k not in drop}, str(directory / "model.safetensors"))
    return tensors


def vllm_logits(directory, hidden: torch.Tensor) -> torch.Tensor:
    """[m, H] target states -> [m, num_heads, vocab] logits as vLLM's Medusa computes them from `directory`."""
    config = json.loads((directory / "config.json").read_text())
    t = load_file(str(directory / "model.safetensors"))
    vocab = config["vocab_size"]
    token_map = t.get("token_map") if config.get("truncated_vocab_size", vocab) < vocab else None
    out = []
    for h in range(config["num_heads"]):
        x = hidden
        for i in range(config["num_hidden_layers"]):
            bias = t[f"blocks.{h}.layers.{i}.bias"] if config.get("medusa_fc_bias") else None
            x = x + F.silu(
                F.linear(x, t[f"blocks.{h}.layers.{i}.weight"].to(x.dtype), None if bias is None else bias.to(x.dtype))
            )
        w = (t["lm_heads.0.weight"] if config.get("original_lm_head") else t[f"lm_heads.{h}.weight"]).to(x.dtype)
        if token_map is not None and w.shape[0] > token_map.numel():
            w = w[token_map]
        logits = x @ w.T
        if token_map is not None:
            full = torch.full((*logits.shape[:-1], vocab), -torch.inf, dtype=logits.dtype)
            full[..., token_map] = logits
            logits = full
        out.append(logits)
    return torch.stack(out, dim=-2)


def specdec_logits(drafter: Medusa, hidden: torch.Tensor) -> torch.Tensor:
    """[m, H] -> [m, num_heads, vocab] logits of `drafter`'s heads, -inf outside its draft vocabulary."""
    model = drafter.model
    if drafter.draft_vocab is None:
        return drafter.heads(hidden, *lm_head_of(model))
    ids = drafter.draft_vocab
    scored = drafter.heads(hidden, vocab=DraftVocab(*lm_head_of(model), ids))  # columns: `ids`, sorted
    full = torch.full((*scored.shape[:-1], model.get_output_embeddings().out_features), -torch.inf, dtype=scored.dtype)
    full[..., ids] = scored
    return full


def states(model, m: int = 5) -> torch.Tensor:
    return torch.randn(m, model.config.hidden_size, generator=torch.Generator().manual_seed(9), dtype=model.dtype)


def assert_exact(model, drafter) -> None:
    for seed in range(2):
        prompt = random_prompt(seed, 6)
        out, stats = run(model, prompt, drafter, 24)
        assert torch.equal(out, reference(model, prompt, 24))
        assert all(len(s.tree) > 0 for s in stats.steps[:-1])  # every step drafted


# ---- (a) a checkpoint written in vLLM's layout loads and drafts what vLLM computes --------------


@pytest.mark.parametrize(
    "original, fc_bias",
    [(False, True), (True, True), (True, False)],
    ids=["own-lm-heads", "original-lm-head", "no-fc-bias"],
)
def test_vllm_layout_loads_and_drafts_exactly(tmp_path, original, fc_bias):
    model = tiny_model("llama")
    write_vllm(tmp_path / "v", model, 1, original=original, fc_bias=fc_bias)
    drafter = Medusa.from_pretrained(tmp_path / "v", model)
    assert (drafter.heads.lm_heads is None) == original  # the target's own lm_head: shared, not copied
    hidden = states(model)
    torch.testing.assert_close(specdec_logits(drafter, hidden), vllm_logits(tmp_path / "v", hidden))
    assert_exact(model, drafter)


@pytest.mark.parametrize("full_rows", [False, True], ids=["map-rows", "full-rows"])
def test_vllm_token_map_becomes_the_draft_vocabulary(tmp_path, full_rows):
    model = tiny_model("llama")
    token_map = torch.tensor([40, 3, 17, 5, 60, 22, 8, 91, 30, 11])  # unsorted, as vLLM allows
    write_vllm(tmp_path / "v", model, 2, original=True, token_map=token_map, full_rows=full_rows)
    drafter = Medusa.from_pretrained(tmp_path / "v", model)
    assert torch.equal(drafter.draft_vocab, token_map.sort().values)
    hidden = states(model)
    torch.testing.assert_close(specdec_logits(drafter, hidden), vllm_logits(tmp_path / "v", hidden))
    assert_exact(model, drafter)


def test_vllm_prefixed_keys_lm_head_name_and_bin_weights_load(tmp_path):
    """vLLM strips a "medusa_heads." prefix, also loads its own parameter name lm_head.weight, and
    reads pytorch_model.bin as well as model.safetensors."""
    model = tiny_model("llama")
    tensors = write_vllm(tmp_path / "v", model, 3, original=True)
    hidden = states(model)
    expected = vllm_logits(tmp_path / "v", hidden)
    renamed = {("lm_head.weight" if k == "lm_heads.0.weight" else "medusa_heads." + k): v for k, v in tensors.items()}
    save_file(renamed, str(tmp_path / "v" / "model.safetensors"))
    torch.testing.assert_close(specdec_logits(Medusa.from_pretrained(tmp_path / "v", model), hidden), expected)
    (tmp_path / "v" / "model.safetensors").unlink()
    torch.save(renamed, tmp_path / "v" / "pytorch_model.bin")
    torch.testing.assert_close(specdec_logits(Medusa.from_pretrained(tmp_path / "v", model), hidden), expected)


def test_fasterdecoding_layout_loads(tmp_path):
    """medusa_lm_head.pt with {h}.{l}.linear.weight/bias and {h}.{num_layers}.weight."""
    model = tiny_model("llama")
    tensors = write_vllm(tmp_path / "v", model, 4)
    fd = tmp_path / "fd"
    fd.mkdir()
    (fd / "config.json").write_text(
        json.dumps({"medusa_num_heads": K, "medusa_num_layers": LAYERS, "base_model_name_or_path": "some/model"})
    )
    renamed = {}
    for h in range(K):
        for i in range(LAYERS):
            for p in ("weight", "bias"):
                renamed[f"{h}.{i}.linear.{p}"] = tensors[f"blocks.{h}.layers.{i}.{p}"]
        renamed[f"{h}.{LAYERS}.weight"] = tensors[f"lm_heads.{h}.weight"]
    torch.save(renamed, fd / "medusa_lm_head.pt")
    drafter = Medusa.from_pretrained(fd, model)
    hidden = states(model)
    torch.testing.assert_close(specdec_logits(drafter, hidden), vllm_logits(tmp_path / "v", hidden))
    assert_exact(model, drafter)
    del renamed[f"1.{LAYERS}.weight"]
    torch.save(renamed, fd / "medusa_lm_head.pt")
    with pytest.raises(CheckpointError, match=rf"medusa_lm_head.pt lacks '1.{LAYERS}.weight'"):
        Medusa.from_pretrained(fd, model)


# ---- (b) export -> import -----------------------------------------------------------------------


@pytest.mark.parametrize("case", ["shared", "own", "draft-vocab"])
def test_export_then_import_gives_the_same_drafter(tmp_path, case):
    model = tiny_model("llama")
    kwargs = {"draft_vocab": torch.arange(0, 96, 3)} if case == "draft-vocab" else {"accuracy": ACCURACY}
    heads = random_heads(model, 5, own=case == "own").float().double()  # float32 values: a checkpoint keeps them
    drafter = Medusa(model, heads, metadata={"training": {"steps": 3}}, **kwargs)
    export_medusa_vllm(drafter, tmp_path / "v")
    assert sorted(p.name for p in (tmp_path / "v").iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((tmp_path / "v" / "config.json").read_text())
    assert config["model_type"] == "medusa" and config["architectures"] == ["MedusaModel"]
    assert (config["num_heads"], config["num_hidden_layers"], config["hidden_size"]) == (K, 2, 32)
    assert config["original_lm_head"] == (case != "own") and config["medusa_fc_bias"] is True
    assert config["truncated_vocab_size"] == (32 if case == "draft-vocab" else 96)
    keys = set(load_file(str(tmp_path / "v" / "model.safetensors")))
    lm_keys = {f"lm_heads.{h}.weight" for h in range(K)} if case == "own" else {"lm_heads.0.weight"}
    assert keys == {
        f"blocks.{h}.layers.{i}.{p}" for h in range(K) for i in range(2) for p in ("weight", "bias")
    } | lm_keys | ({"token_map"} if case == "draft-vocab" else set())
    hidden = states(model)
    # What vLLM would compute from the files is what the original heads compute.
    torch.testing.assert_close(vllm_logits(tmp_path / "v", hidden), specdec_logits(drafter, hidden))
    loaded = Medusa.from_pretrained(tmp_path / "v", model)
    assert torch.equal(specdec_logits(loaded, hidden), specdec_logits(drafter, hidden))
    assert (loaded.heads.lm_heads is None) == (case != "own")
    assert loaded.metadata == drafter.metadata  # accuracy (the calibrated tree) and training record come back
    assert_same_drafts(model, drafter, loaded)


def test_lower_precision_export_still_shares_the_targets_lm_head(tmp_path):
    """Exported from a bf16 target, loaded with the float32 one: its lm_head rows, rounded, are
    still the target's, so the heads share it (and keep the draft vocabulary)."""
    low = named_model("base-a").to(torch.bfloat16)
    export_medusa_vllm(Medusa(low, random_heads(low, 0), draft_vocab=torch.arange(10)), tmp_path / "v")
    loaded = Medusa.from_pretrained(tmp_path / "v", named_model("base-a"))
    assert loaded.heads.lm_heads is None and torch.equal(loaded.draft_vocab, torch.arange(10))


def test_export_replaces_atomically_and_refuses_medusa_2(tmp_path, monkeypatch):
    model = tiny_model("llama")
    first = Medusa(model, random_heads(model, 0))
    export_medusa_vllm(first, tmp_path / "v")
    before = (tmp_path / "v" / "model.safetensors").read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("specdec.drafters.medusa_formats.save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        export_medusa_vllm(Medusa(model, random_heads(model, 1)), tmp_path / "v")
    assert (tmp_path / "v" / "model.safetensors").read_bytes() == before  # the old export, whole
    assert [p.name for p in tmp_path.iterdir()] == ["v"]  # no staging directory left behind
    medusa2 = Medusa(
        model,
        random_heads(model, 0),
        backbone_lora={"a": torch.zeros(1)},
        metadata={"backbone": {"fingerprint": checkpoint.fingerprint(model)}},
    )
    with pytest.raises(ValueError, match="Medusa-2"):
        export_medusa_vllm(medusa2, tmp_path / "m2")
    assert not (tmp_path / "m2").exists()


# ---- (c) refusals -------------------------------------------------------------------------------


def test_vllm_checkpoint_for_another_model_is_refused(tmp_path):
    model = tiny_model("llama")
    write_vllm(tmp_path / "v", model, 1)
    with pytest.raises(CheckpointError, match=r"config.json says hidden_size=32 but this model has hidden_size=48"):
        Medusa.from_pretrained(tmp_path / "v", named_model("other", hidden=48))
    with pytest.raises(CheckpointError, match=r"config.json says vocab_size=96 but this model has vocab_size=128"):
        Medusa.from_pretrained(tmp_path / "v", tiny_model("llama", vocab=128))
    # An export records its target: another model of the same sizes is refused by name, as specdec's own format is.
    base = named_model("base-a")
    export_medusa_vllm(Medusa(base, random_heads(base, 0).float()), tmp_path / "e")
    with pytest.raises(CheckpointError, match="base model 'base-a'"):
        Medusa.from_pretrained(tmp_path / "e", named_model("base-b"))
    Medusa.from_pretrained(tmp_path / "e", named_model("base-b"), check_base_model=False)


@pytest.mark.parametrize(
    "drop, kwargs, message",
    [
        (
            ("blocks.1.layers.0.bias",),
            {},
            r"model.safetensors lacks 'blocks.1.layers.0.bias' \(head 1's layer 0 bias\)",
        ),
        (("lm_heads.2.weight",), {}, r"model.safetensors lacks 'lm_heads.2.weight' \(head 2's lm_head\)"),
        (("lm_heads.0.weight",), {"original": True}, r"lacks 'lm_heads.0.weight'"),
        (("token_map",), {"original": True, "token_map": torch.arange(8)}, r"needs 'token_map'"),
        ((), {"num_heads": 0}, r"config.json needs num_heads as an int >= 1, got 0"),
        ((), {"logit_scale": 2.0}, r"logit_scale=2.0"),
        ((), {"token_map": torch.arange(8)}, r"weights other than the target's lm_head rows"),
        ((), {"original": True, "token_map": torch.tensor([1, 1, 2])}, r"outside \[0, 96\) or repeated"),
    ],
    ids=["bias", "lm-head", "original-lm-head", "token-map", "num-heads", "logit-scale", "own-truncated", "dup-map"],
)
def test_incomplete_or_unsupported_vllm_checkpoint_is_refused(tmp_path, drop, kwargs, message):
    model = tiny_model("llama")
    write_vllm(tmp_path / "v", model, 1, drop=drop, **kwargs)
    with pytest.raises(CheckpointError, match=message):
        Medusa.from_pretrained(tmp_path / "v", model)


def test_wrong_shapes_and_broken_files_are_refused(tmp_path):
    model = tiny_model("llama")
    tensors = write_vllm(tmp_path / "v", model, 1)
    save_file({**tensors, "blocks.0.layers.1.weight": torch.zeros(32, 48)}, str(tmp_path / "v" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"'blocks.0.layers.1.weight' with shape \[32, 48\].* \[32, 32\]"):
        Medusa.from_pretrained(tmp_path / "v", model)
    (tmp_path / "v" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"has config.json but no weights \(model.safetensors or "):
        Medusa.from_pretrained(tmp_path / "v", model)
    (tmp_path / "v" / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match=r"model.safetensors cannot be read"):
        Medusa.from_pretrained(tmp_path / "v", model)
    (tmp_path / "v" / "config.json").write_text("{")
    with pytest.raises(CheckpointError, match=r"config.json is not valid JSON"):
        Medusa.from_pretrained(tmp_path / "v", model)


# ---- (d) specdec export -------------------------------------------------------------------------


def one_error_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("specdec: error: "), err
    return lines[0]


@pytest.fixture
def tiny_loading(monkeypatch):
    """Every model name loads the tiny random model (recorded in `loaded`)."""
    loaded = []

    def load_model(name, *args, **kwargs):
        loaded.append(name)
        return tiny_model("llama"), None

    monkeypatch.setattr(specdec.models, "load_model", load_model)
    return loaded


def test_cli_export_writes_what_loads_back(tmp_path, capsys, tiny_loading):
    model = tiny_model("llama")
    drafter = Medusa(model, random_heads(model, 2), accuracy=ACCURACY)
    drafter.save_pretrained(tmp_path / "ckpt")
    args = [
        "export",
        "--kind",
        "medusa",
        "--format",
        "vllm",
        "--drafter-dir",
        str(tmp_path / "ckpt"),
        "--output-dir",
        str(tmp_path / "out"),
    ]
    assert cli.main(args) == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "medusa"
    assert_same_drafts(model, drafter, Medusa.from_pretrained(tmp_path / "out", model))
    capsys.readouterr()
    assert cli.main(args) == 2  # the output directory is not empty now
    assert "--overwrite" in one_error_line(capsys.readouterr().err)
    Medusa(model, random_heads(model, 3)).save_pretrained(tmp_path / "ckpt")
    assert cli.main([*args, "--overwrite"]) == 0
    assert not torch.equal(
        specdec_logits(Medusa.from_pretrained(tmp_path / "out", model), states(model)),
        specdec_logits(drafter, states(model)),
    )  # replaced by the new heads


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--kind", "eagle"],
            r"--kind eagle --format vllm is not an export; choose one of: --kind medusa --format vllm",
        ),
        (["--format", "onnx"], r"--kind medusa --format onnx is not an export"),
        ([], r"needs --output-dir"),
        (["--output-dir", "{tmp}/file"], r"exists and is not a directory"),
        (["--output-dir", "{tmp}/full"], r"exists and is not empty; pass --overwrite"),
        (
            ["--output-dir", "{tmp}/new", "--drafter-dir", "{tmp}/nothing"],
            r"--drafter-dir .*nothing: no such directory",
        ),
        (["--output-dir", "{tmp}/new", "--dtype", "int8"], r"--dtype 'int8'"),
    ],
    ids=["eagle", "format", "no-output", "output-file", "output-full", "no-drafter-dir", "dtype"],
)
def test_cli_export_refuses_before_loading(tmp_path, capsys, tiny_loading, args, message):
    (tmp_path / "file").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert cli.main(["export", *(a.replace("{tmp}", str(tmp_path)) for a in args)]) == 2
    assert re.search(message, one_error_line(capsys.readouterr().err))
    assert not tiny_loading and not (tmp_path / "new").exists()


def test_cli_export_without_a_shipped_drafter_is_one_line(tmp_path, capsys, tiny_loading):
    assert cli.main(["export", "--output-dir", str(tmp_path / "out")]) == 2
    assert "no shipped 'medusa' drafter" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()
