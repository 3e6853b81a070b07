"""The CLI's refusals (issue 20): bad inputs and Ctrl-C get one `specdec: error:` (or
`specdec: interrupted`) line and the right exit status, before any long work.

In-process through `specdec.cli.main`; model loading is replaced by a tiny random model (or by a
function that fails the test, where nothing may load before the refusal)."""

from __future__ import annotations

import json

import pytest

import specdec.models
from conftest import tiny_model
from helpers import WordTokenizer
from specdec import cli
from specdec.bench import read_questions

GOOD = {"question_id": 1, "category": "qa", "turns": ["Name a color."]}


def one_error_line(err: str) -> str:
    """The single `specdec: error:` line of stderr (and nothing else there)."""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("specdec: error: "), err
    return lines[0]


@pytest.fixture
def no_loading(monkeypatch):
    """Loading a model fails the test: the refusal must come first."""

    def load_model(name, *args, **kwargs):
        raise AssertionError(f"loaded {name} before refusing the arguments")

    monkeypatch.setattr(specdec.models, "load_model", load_model)


@pytest.fixture
def tiny_loading(monkeypatch):
    """Every model name loads the tiny random model; no cost profile is measured."""
    monkeypatch.setattr(specdec.models, "load_model", lambda name, *args, **kwargs: (tiny_model(), WordTokenizer()))
    monkeypatch.setattr(cli, "ensure_profiles", lambda target, draft=None: None)


@pytest.fixture
def no_demo(monkeypatch):
    """Building the demo page (which preloads a model) fails the test."""
    import specdec.demo

    def build_demo(**kwargs):
        raise AssertionError("built the demo (preloading its model) before refusing the arguments")

    monkeypatch.setattr(specdec.demo, "build_demo", build_demo)


def write_lines(path, *lines) -> str:
    path.write_bytes(
        b"\n".join(line if isinstance(line, bytes) else json.dumps(line).encode() for line in lines) + b"\n"
    )
    return str(path)


@pytest.mark.parametrize(
    "bad, complaint",
    [
        ({"question_id": 2, "category": "qa", "turns": "Name a color."}, "turns"),  # every character a turn
        ({"question_id": 2, "category": "qa", "turns": []}, "turns"),
        ({"question_id": 2, "category": "qa", "turns": ["Fine.", ""]}, "turns"),
        ({"question_id": 2, "category": "qa", "turns": ["Fine.", 3]}, "turns"),
        ({"question_id": 2, "category": 3, "turns": ["Fine."]}, "category"),
        ({"question_id": None, "category": "qa", "turns": ["Fine."]}, "question_id"),
        ([GOOD], "question_id"),  # not an object
    ],
    ids=[
        "turns-string",
        "turns-empty",
        "turn-empty",
        "turn-number",
        "category-number",
        "question_id-null",
        "not-object",
    ],
)
def test_bench_refuses_bad_question_schema(tmp_path, capsys, no_loading, bad, complaint):
    path = write_lines(tmp_path / "q.jsonl", GOOD, bad)
    with pytest.raises(ValueError, match=rf"^{path}:2: .*{complaint}"):
        read_questions(path)
    assert cli.main(["bench", "--questions", path]) == 2
    assert f"{path}:2: " in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize(
    "bad, complaint",
    [
        (b'{"question_id": 2, "category": "qa", ', "not valid JSON"),
        (b'{"question_id": 2, "category": "caf\xe9"}', "UTF-8"),
    ],
    ids=["json", "utf8"],
)
def test_bench_json_and_utf8_errors_name_file_and_line(tmp_path, capsys, no_loading, bad, complaint):
    path = write_lines(tmp_path / "q.jsonl", GOOD, GOOD, bad)
    assert cli.main(["bench", "--questions", path]) == 2
    line = one_error_line(capsys.readouterr().err)
    # json's own "line 1 column ..." misleads
    assert f"{path}:3: " in line and complaint in line and "line 1" not in line


@pytest.mark.parametrize("suffix", [".jsonl", ".txt"])
def test_datastore_corpus_utf8_error_names_file_and_line(tmp_path, suffix):
    from specdec.drafters.retrieval import read_corpus

    path = tmp_path / f"corpus{suffix}"
    path.write_bytes(b'{"text": "fine"}\n\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=rf"^{path}:3: not UTF-8"):
        list(read_corpus(path))


def test_generate_refuses_non_utf8_prompt(capsys, no_loading):
    prompt = b"caf\xe9 au lait".decode("utf-8", "surrogateescape")  # what Python makes of such an argv byte
    assert cli.main(["generate", prompt]) == 2
    assert "UTF-8" in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("command", ["generate", "bench", "profile", "demo"])
@pytest.mark.parametrize("threads", ["0", "-2"])
def test_threads_below_one_refused(tmp_path, capsys, no_loading, no_demo, command, threads):
    args = {"generate": ["Say hi."], "bench": ["--questions", write_lines(tmp_path / "q.jsonl", GOOD)]}.get(command, [])
    assert cli.main([command, "--threads", threads, *args]) == 2
    assert f"--threads must be >= 1, got {threads}" in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("port", ["99999", "0", "-1"])
def test_demo_refuses_port_out_of_range(capsys, no_loading, no_demo, port):
    assert cli.main(["demo", "--port", port]) == 2
    assert f"--port must be in 1..65535, got {port}" in one_error_line(capsys.readouterr().err)


def test_demo_refuses_busy_port_before_printing_the_url(capsys, no_loading, no_demo):
    import socket

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert cli.main(["demo", "--port", str(port)]) == 2
    line = one_error_line(capsys.readouterr().err)  # and no "specdec demo: http://..." line
    assert f"127.0.0.1:{port} is in use" in line and "--port" in line


@pytest.mark.parametrize("command", ["generate", "bench"])
def test_missing_datastore_refused_before_profiling(tmp_path, capsys, monkeypatch, tiny_loading, command):
    def ensure_profiles(target, draft=None):
        raise AssertionError("profiled before checking the drafter's resources")

    monkeypatch.setattr(cli, "ensure_profiles", ensure_profiles)
    store = str(tmp_path / "no-datastore")
    args = {
        "generate": ["generate", "--drafter", "retrieval", "--datastore", store, "Say hi."],
        "bench": [
            "bench",
            "--methods",
            "baseline,retrieval",
            "--datastore",
            store,
            "--questions",
            write_lines(tmp_path / "q.jsonl", GOOD),
        ],
    }[command]
    assert cli.main(args) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "needs a datastore" in line and store in line


def test_help_names_boolean_options_positively(capsys, tiny_loading):
    helps = {}
    for command in cli.COMMANDS:
        with pytest.raises(SystemExit) as exit:
            cli.main([command, "--help"])
        assert exit.value.code == 0
        helps[command] = capsys.readouterr().out
    assert not [c for c, text in helps.items() if "--no-no-" in text]
    assert "--chat, --no-chat" in helps["generate"]
    for flag, chats in (["--chat"], 1), ([], 1), (["--no-chat"], 0):  # the chat template is still the default
        WordTokenizer.chats = 0
        assert cli.main(["generate", *flag, "--drafter", "none", "--max-new-tokens", "2", "Say hi."]) == 0
        assert WordTokenizer.chats == chats, flag


def interrupted(args) -> int | str:
    """`cli.main(args)`; a KeyboardInterrupt that escapes it is returned, not raised (pytest would stop)."""
    try:
        return cli.main(args)
    except KeyboardInterrupt:
        return "KeyboardInterrupt escaped"


def test_ctrl_c_during_generate(capsys, monkeypatch, tiny_loading):
    decoded = []

    def decode(self, ids, skip_special_tokens=True):  # the streamer decodes once per new token
        decoded.append(len(ids))
        if len(decoded) == 3:
            raise KeyboardInterrupt
        return "".join(f"w{int(i)} " for i in ids)

    monkeypatch.setattr(WordTokenizer, "decode", decode)
    assert interrupted(["generate", "--drafter", "none", "--max-new-tokens", "8", "Say hi."]) == 130
    out, err = capsys.readouterr()
    assert out.startswith("w") and out.endswith(" \n")  # the streamed words, their line ended
    assert err == "specdec: interrupted\n"


def test_ctrl_c_during_bench_keeps_the_finished_questions(tmp_path, capsys, monkeypatch, tiny_loading):
    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=False):
        if messages[-1]["content"] == "STOP":  # Ctrl-C while question 2 runs
            raise KeyboardInterrupt
        return " ".join(m["content"] for m in messages) + " >"

    monkeypatch.setattr(WordTokenizer, "apply_chat_template", apply_chat_template)
    questions = write_lines(
        tmp_path / "q.jsonl", GOOD, {**GOOD, "question_id": 2, "turns": ["STOP"]}, {**GOOD, "question_id": 3}
    )
    out = tmp_path / "out"
    args = ["bench", "--questions", questions, "--methods", "baseline,prompt-lookup", "--max-new-tokens", "3",
            "--packed-from", "none", "--out", str(out)]
    assert interrupted(args) == 130
    err = capsys.readouterr().err
    before, _, line = err.rpartition("specdec: interrupted")
    assert "Traceback" not in err and before.endswith("\n") and line.count("\n") == 1  # one line, on a line of its own
    assert f"{out}/results.json" in line and "1 finished question" in line
    saved = json.loads((out / "results.json").read_text())  # valid, with question 1's records only
    assert [(r["question_id"], r["method"]) for r in saved["records"]] == [(1, "baseline"), (1, "prompt-lookup")]
    assert sorted(p.name for p in out.iterdir()) == ["report.md", "results.json"]  # nothing half-written


def test_bench_refuses_packed_from_before_loading(tmp_path, capsys, no_loading):
    path = write_lines(tmp_path / "q.jsonl", GOOD)
    assert cli.main(["bench", "--questions", path, "--packed-from", "0"]) == 2
    assert "--packed-from" in one_error_line(capsys.readouterr().err)
