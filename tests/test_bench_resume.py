"""`specdec bench --resume` (issue 19): an interrupted run continues where it stopped.

In-process through `specdec.cli.main` on the tiny random model; each question's first turn names it
("Q1 ...") so the chat-template calls count the questions that ran."""

from __future__ import annotations

import json
from collections import Counter

import pytest

import specdec.models
from conftest import tiny_model
from helpers import WordTokenizer
from specdec import cli

QUESTIONS = [
    {"question_id": 1, "category": "qa", "turns": ["Q1 Name a color.", "And another?"]},
    {"question_id": 2, "category": "math", "turns": ["Q2 Add two and two."]},
    {"question_id": 3, "category": "qa", "turns": ["Q3 Name a fruit."]},
]


class Counting(WordTokenizer):
    """Counts chat-template calls per question; raises KeyboardInterrupt on the question in `stop_at`."""

    stop_at: int | None = None
    ran: Counter = Counter()

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=False):
        first = messages[0]["content"]
        if first.startswith("Q"):
            qid = int(first.split()[0][1:])
            if qid == Counting.stop_at:
                raise KeyboardInterrupt
            Counting.ran[qid] += 1
        return super().apply_chat_template(messages, add_generation_prompt, tokenize)


@pytest.fixture
def tiny_loading(monkeypatch):
    """Every model name loads the same tiny random model with the counting tokenizer; no profiling."""
    Counting.stop_at, Counting.ran = None, Counter()
    monkeypatch.setattr(specdec.models, "load_model", lambda name, *args, **kwargs: (tiny_model(), Counting()))
    monkeypatch.setattr(cli, "ensure_profiles", lambda target, draft=None: None)


def bench(tmp_path, out: str, *extra: str) -> int | str:
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    args = ["bench", "--questions", str(path), "--methods", "baseline,prompt-lookup", "--max-new-tokens", "3",
            "--packed-from", "none", "--out", str(tmp_path / out), *extra]
    try:
        return cli.main(args)
    except KeyboardInterrupt:  # pytest would stop
        return "KeyboardInterrupt escaped"


def records(tmp_path, out: str) -> list[tuple]:
    saved = json.loads((tmp_path / out / "results.json").read_text())["records"]
    return sorted((r["question_id"], r["turn"], r["method"], r["new_tokens"], r["exact"]) for r in saved)


def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, capsys, tiny_loading):
    assert bench(tmp_path, "whole") == 0
    assert set(Counting.ran) == {1, 2, 3}

    Counting.stop_at, Counting.ran = 2, Counter()
    assert bench(tmp_path, "part") == 130  # question 1 finished, Ctrl-C in question 2
    assert {r[0] for r in records(tmp_path, "part")} == {1}
    capsys.readouterr()

    Counting.stop_at, Counting.ran = None, Counter()
    assert bench(tmp_path, "part", "--resume") == 0
    assert set(Counting.ran) == {2, 3}  # question 1 did not run again
    assert records(tmp_path, "part") == records(tmp_path, "whole")
    assert "1 finished question(s) kept" in capsys.readouterr().err
    assert "1 question(s) resumed" in (tmp_path / "part" / "report.md").read_text()
    assert "resumed" not in (tmp_path / "whole" / "report.md").read_text()

    Counting.ran = Counter()
    assert bench(tmp_path, "part", "--resume") == 0  # all finished: nothing runs, the report stays whole
    assert not Counting.ran and records(tmp_path, "part") == records(tmp_path, "whole")


def test_partly_recorded_question_runs_again(tmp_path, tiny_loading):
    assert bench(tmp_path, "out") == 0
    path = tmp_path / "out" / "results.json"
    saved = json.loads(path.read_text())
    whole = records(tmp_path, "out")
    keep = [r for r in saved["records"] if (r["question_id"], r["turn"]) != (1, 1) and r["question_id"] != 3]
    saved["records"] = keep
    path.write_text(json.dumps(saved))  # question 1 lacks its second turn, question 3 is missing
    Counting.ran = Counter()
    assert bench(tmp_path, "out", "--resume") == 0
    assert set(Counting.ran) == {1, 3}
    assert records(tmp_path, "out") == whole  # no duplicate of question 1's first turn


@pytest.mark.parametrize(
    "flag, value",
    [("--max-new-tokens", "4"), ("--methods", "baseline,hf-prompt-lookup"), ("--temperature", "0.7"),
     ("--model", "other-model"), ("--no-guard", None)],
)
def test_resume_refuses_a_different_config_naming_the_field(tmp_path, capsys, tiny_loading, flag, value):
    assert bench(tmp_path, "out") == 0
    before = (tmp_path / "out" / "results.json").read_text()
    capsys.readouterr()
    extra = [flag] + ([value] if value is not None else [])
    # later argparse values win over bench()'s own --max-new-tokens and --methods
    assert bench(tmp_path, "out", "--resume", *extra) == 2
    err = capsys.readouterr().err
    name = "--guard" if flag == "--no-guard" else flag
    assert err.startswith("specdec: error: --resume: ") and err.count("\n") == 1 and f"{name} is " in err, err
    assert (tmp_path / "out" / "results.json").read_text() == before


def test_resume_refuses_other_questions_file_but_not_another_selection(tmp_path, capsys, tiny_loading):
    assert bench(tmp_path, "out", "--limit", "1") == 0
    Counting.ran = Counter()
    assert bench(tmp_path, "out", "--resume") == 0  # a larger selection extends the run
    assert set(Counting.ran) == {2, 3}
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps(QUESTIONS[0]) + "\n")
    capsys.readouterr()
    assert cli.main(["bench", "--questions", str(other), "--methods", "baseline,prompt-lookup", "--max-new-tokens",
                     "3", "--packed-from", "none", "--out", str(tmp_path / "out"), "--resume"]) == 2
    assert "--questions is " in capsys.readouterr().err


def test_without_resume_an_existing_results_file_is_refused(tmp_path, capsys, monkeypatch, tiny_loading):
    assert bench(tmp_path, "out") == 0
    before = (tmp_path / "out" / "results.json").read_text()
    capsys.readouterr()

    def load_model(name, *args, **kwargs):
        raise AssertionError(f"loaded {name} before refusing")

    monkeypatch.setattr(specdec.models, "load_model", load_model)
    assert bench(tmp_path, "out") == 2
    err = capsys.readouterr().err
    assert err.startswith("specdec: error: --out ") and err.count("\n") == 1 and "--resume" in err, err
    assert (tmp_path / "out" / "results.json").read_text() == before


def test_resume_without_earlier_results_runs_everything(tmp_path, tiny_loading):
    assert bench(tmp_path, "fresh", "--resume") == 0
    assert set(Counting.ran) == {1, 2, 3}
    assert "resumed" not in (tmp_path / "fresh" / "report.md").read_text()


def test_resume_refuses_another_machine(tmp_path, capsys, tiny_loading):
    assert bench(tmp_path, "out") == 0
    path = tmp_path / "out" / "results.json"
    saved = json.loads(path.read_text())
    path.write_text(json.dumps({**saved, "device": "NVIDIA H100 (cuda:0), float16"}))
    capsys.readouterr()
    Counting.ran = Counter()
    assert bench(tmp_path, "out", "--resume") == 2
    err = capsys.readouterr().err
    assert err.startswith("specdec: error: --resume: ") and "NVIDIA H100" in err and not Counting.ran, err
