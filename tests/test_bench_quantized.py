"""`specdec bench` with quantized drafts, first and later turns reported apart, and draft memory."""

from __future__ import annotations

import copy
import json

import pytest

import specdec.models
from conftest import tiny_model
from helpers import WordTokenizer
from specdec import cli
from specdec.bench import FIRST, LATER, BenchConfig, Record, check_methods, read_questions, summarize

QUESTIONS = [
    {"question_id": 1, "category": "qa", "turns": ["Name a color.", "And another?"]},
    {"question_id": 2, "category": "math", "turns": ["Add two and two."]},
]


@pytest.fixture
def fp32_loading(monkeypatch):
    """Every model name loads a float32 copy of the tiny random model (the int8 kernels take fp32)."""
    model = copy.deepcopy(tiny_model()).float()
    monkeypatch.setattr(specdec.models, "load_model", lambda name, *args, **kwargs: (model, WordTokenizer()))
    monkeypatch.setattr(cli, "ensure_profiles", lambda target, draft=None: None)


def questions_file(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    return path


def test_quantized_draft_is_shared_with_hf_assisted(tmp_path, fp32_loading):
    methods = "baseline,hf-assisted,draft-model,draft-model[quantized],quantized-self+prompt-lookup"
    code = cli.main(["bench", "--questions", str(questions_file(tmp_path)), "--methods", methods,
                     "--draft-model", "tiny", "--quantize-draft", "int8", "--max-new-tokens", "6",
                     "--packed-from", "none", "--out", str(tmp_path / "out")])
    assert code == 0  # every output equals model.generate's
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    drafted = {r["method"]: r["draft_bytes"] for r in saved["records"]}
    fp32_bytes, int8_bytes = drafted["draft-model"], drafted["draft-model[quantized]"]
    assert drafted["hf-assisted"] == int8_bytes < fp32_bytes  # the assistant is the same int8 copy
    assert drafted["quantized-self+prompt-lookup"] > 0  # a composition reports its parts' memory
    summary = saved["summary"]
    assert summary["baseline"][FIRST]["turns"] == 2 and summary["baseline"][LATER]["turns"] == 1
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| first turns |" in report and "| later turns |" in report and "Peak resident memory" in report


def test_first_turns_only(tmp_path):
    questions = read_questions(str(questions_file(tmp_path)), first_turns=True)
    assert [q["turns"] for q in questions] == [["Name a color."], ["Add two and two."]]


def test_summary_splits_first_and_later_turns():
    records = [Record(1, "qa", turn, method, 10, seconds, 10 if method == "baseline" else 5, True)
               for turn in (0, 1) for method, seconds in (("baseline", 2.0), ("x", 1.0 if turn == 0 else 2.0))]
    summary = summarize(records)
    assert summary["x"][FIRST]["speedup"] == pytest.approx(2.0)
    assert summary["x"][LATER]["speedup"] == pytest.approx(1.0)
    assert summary["x"]["overall"]["speedup"] == pytest.approx(4 / 3)


@pytest.mark.parametrize("kwargs, message", [
    (dict(methods="baseline,draft-model[quantized]", draft_model="d"), "needs --quantize-draft SCHEME"),
    (dict(methods="baseline", quantize_draft="int8"), "--quantize-draft needs --draft-model"),
    (dict(methods="baseline", quantize_draft="int4", draft_model="d"), "--quantize-draft: unknown scheme 'int4'"),
])
def test_quantize_draft_mistakes_refused_before_loading(kwargs, message):
    with pytest.raises(ValueError, match=message):
        check_methods(BenchConfig(**kwargs))
