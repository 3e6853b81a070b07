"""A missing optional dependency is refused naming the extra that installs it (specdec.extras)."""

from __future__ import annotations

import sys

import pytest

import specdec.models
from specdec import cli
from specdec.extras import require


def hide(monkeypatch, *modules):
    """Make `modules` fail to import, as if not installed (None in sys.modules stops the import)."""
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)


def test_require_imports_or_names_the_extra(monkeypatch):
    assert require("json", "bench") is sys.modules["json"]
    hide(monkeypatch, "matplotlib")
    with pytest.raises(ImportError, match=r"matplotlib is not installed .*pip install 'specdec\[bench\]'"):
        require("matplotlib", "bench")
    with pytest.raises(ValueError, match="unknown extra 'benchmark'; the extras are bench, train, demo"):
        require("json", "benchmark")


def test_medusa2_without_peft_names_the_train_extra(monkeypatch):
    from specdec.drafters.medusa import lora_config

    hide(monkeypatch, "peft")
    with pytest.raises(ImportError, match=r"peft .*specdec\[train\]"):
        lora_config({"lora": {"r": 4}})


@pytest.mark.parametrize(
    "argv, module, extra",
    [
        (["bench", "--methods", "baseline,prompt-lookup"], "matplotlib", "bench"),
        (["demo"], "gradio", "demo"),
        (["train", "make-data", "--model", "x", "--output-dir", "out"], "datasets", "train"),
        (["train", "medusa", "--model", "x", "--data", "d", "--output-dir", "out"], "peft", "train"),
    ],
)
def test_cli_names_the_missing_extra_before_loading(argv, module, extra, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(specdec.models, "load_model", lambda *a, **k: pytest.fail("loaded a model first"))
    hide(monkeypatch, module)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("specdec: error: ") and "\n" not in err
    assert f"{module} is not installed" in err and f"pip install 'specdec[{extra}]'" in err
    assert list(tmp_path.iterdir()) == []  # nothing written
