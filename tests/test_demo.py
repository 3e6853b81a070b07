"""The demo: the pure comparison (no gradio), the request handler, and a real browser session."""

from __future__ import annotations

import html
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import random_prompt, tiny_model
from specdec.demo.app import DEFAULT_PROMPT, DemoError, Session, respond
from specdec.demo.compare import (
    DRAFT,
    TARGET,
    Piece,
    Trace,
    accepted_per_step,
    bar_svg,
    frame,
    live_stats,
    render,
    texts,
    trace_plain,
    trace_spec,
)
from specdec.drafters import PromptLookup

ROOT = Path(__file__).resolve().parents[1]


class FakeTokenizer:
    """Enough of a tokenizer for `encode_chat` and decoding: one letter per token id."""

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=False):
        return " ".join(m["content"] for m in messages) + " >"

    def __call__(self, text, add_special_tokens=False):
        class Out:
            input_ids = [(ord(c) * 7) % 90 for c in text]

        return Out()

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + i % 26) for i in ids)


def repetitive_prompt():
    return torch.tensor([[5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6, 7]])


def test_both_traces_produce_the_same_tokens_and_consistent_timing():
    model = tiny_model()
    ids = random_prompt(3, 20)
    plain = trace_plain(model, ids, 24)
    spec = trace_spec(model, ids, PromptLookup(min_ngram=1), 24)
    assert plain.tokens == spec.tokens and len(plain.tokens) == 24
    assert plain.steps == 24 and plain.mean_accepted == 1.0
    assert sum(accepted_per_step(spec)) == 24 and len(accepted_per_step(spec)) == spec.steps
    for trace in (plain, spec):
        times = [p.t for p in trace.pieces]
        assert times == sorted(times) and times[-1] <= trace.seconds
    assert {p.source for p in spec.pieces} <= {DRAFT, TARGET}


def test_frames_and_live_stats_follow_the_clock():
    plain = Trace(
        (Piece(0.1, (1,), TARGET), Piece(0.2, (2,), TARGET), Piece(0.3, (3,), TARGET), Piece(0.4, (4,), TARGET)), 0.4, 4
    )
    spec = Trace((Piece(0.1, (1, 2), DRAFT), Piece(0.1, (3,), TARGET), Piece(0.2, (4,), TARGET)), 0.2, 2)
    assert frame(plain, 0.25) == list(plain.pieces[:2]) and frame(spec, 0.05) == []
    mid = live_stats(plain, spec, 0.1)
    assert mid.speedup is None and mid.mean_accepted == 3.0 and mid.plain_tokens_per_s == pytest.approx(10.0)
    end = live_stats(plain, spec, 0.4)
    assert end.speedup == pytest.approx(2.0) and end.mean_accepted == 2.0
    assert accepted_per_step(spec) == [3, 1]


def test_render_highlights_drafted_text_only():
    tok = FakeTokenizer()
    pieces = [Piece(0.1, (0, 1), DRAFT), Piece(0.1, (2,), TARGET)]
    out = render(pieces, tok, colour=True)
    assert '<span class="draft" style="background:' in out and "ab</span>" in out and ">c</span>" in out
    assert "background" not in render(pieces, tok, colour=False)
    assert "&lt;" in render([Piece(0.0, (0,), TARGET)], type("T", (), {"decode": lambda self, ids, **k: "<"})(), True)


def test_texts_keep_multi_token_characters_whole():
    class Bytes:  # ids are UTF-8 bytes: a prefix can end inside a character
        def decode(self, ids, skip_special_tokens=True):
            return bytes(ids).decode("utf-8", errors="replace").rstrip("\ufffd")

    pieces = [Piece(0, (0xC3,), TARGET), Piece(0, (0xA9, 0x61), TARGET)]  # "é" split over two pieces, then "a"
    assert "".join(text for text, _ in texts(pieces, Bytes())) == "éa"


def test_bar_svg():
    assert bar_svg([]) == ""
    svg = bar_svg([1, 3, 2])
    assert svg.count("<rect") == 3 and "max 3" in svg


def tiny_session(fail: Exception | None = None):
    def load(name):
        if fail is not None:
            raise fail
        return tiny_model(), FakeTokenizer()

    return Session(load)


def test_respond_streams_identical_panes_and_stats():
    frames = list(
        respond(tiny_session(), "copy copy copy copy", [], "smollm2-135m", "prompt-lookup", 16, 0, realtime=False)
    )
    chat, history, plain_html, spec_html, stats, plot, status = frames[-1]
    assert status == "Done."
    assert chat[-1]["role"] == "assistant" and history == chat and len(chat) == 2
    text = lambda h: html.unescape(re.sub(r"<[^>]+>", "", h))  # noqa: E731 - span boundaries differ
    assert text(plain_html) == text(spec_html) != "" and "pane-text" in plain_html
    assert 'class="draft"' in spec_html and 'class="draft"' not in plain_html
    assert "speedup" in stats and "outputs identical" in stats and "<svg" in plot


def test_respond_samples_at_a_temperature():
    frames = list(
        respond(
            tiny_session(), "copy copy", [], "smollm2-135m", "prompt-lookup", 12, 0, temperature=0.8, realtime=False
        )
    )
    chat, history, plain_html, spec_html, stats, plot, status = frames[-1]
    assert status == "Done." and "sampled: same distribution" in stats and "pane-text" in spec_html
    bad = list(respond(tiny_session(), "hi", [], "smollm2-135m", "prompt-lookup", 4, 0, temperature=-1, realtime=False))
    assert "temperature" in bad[-1][-1]


@pytest.mark.parametrize(
    "session, drafter, expected",
    [
        (tiny_session(OSError("model 'x' is not installed: pip install ...")), "prompt-lookup", "Could not load model"),
        (tiny_session(), "no-such-drafter", "Unknown drafter"),
        (tiny_session(), "draft-model", "needs a smaller model"),
    ],
)
def test_respond_shows_errors_in_the_page(session, drafter, expected):
    frames = list(respond(session, "hello", [], "smollm2-135m", drafter, 8, 0, realtime=False))
    assert expected in frames[-1][-1] and frames[-1][-1].startswith("**Error:**")
    assert list(respond(session, "   ", [], "smollm2-135m", drafter, 8, 0))[-1][-1] == "Type a message first."


def test_budget_reaches_the_drafter():
    assert tiny_session().drafter("prompt-lookup-tree", "smollm2-135m", 5).budget == 5
    with pytest.raises(DemoError):
        tiny_session().drafter("draft-model-tree", "smollm2-135m", 0)


def test_build_demo_returns_blocks_without_launching():
    gr = pytest.importorskip("gradio")
    from specdec.demo import build_demo

    demo = build_demo(load_model=lambda name: (tiny_model(), FakeTokenizer()))
    assert isinstance(demo, gr.Blocks)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
@pytest.mark.browser
def test_demo_in_a_real_browser(tmp_path):
    """Start `specdec demo`, drive it in headless Chromium, compare the panes, keep a screenshot."""
    if CHROMIUM is None:
        if os.environ.get("SPECDEC_REQUIRE_BROWSER"):
            pytest.fail("SPECDEC_REQUIRE_BROWSER is set but no chromium is installed (apt-get install chromium)")
        pytest.skip("no system chromium (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    port = free_port()
    log = open(tmp_path / "demo.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "specdec", "demo", "--port", str(port), "--threads", "2"],
        stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
        env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"},
    )
    try:
        deadline = time.time() + 300
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert server.poll() is None, (tmp_path / "demo.log").read_text()
                assert time.time() < deadline, "the demo did not start in 300 s"
                time.sleep(1)
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(f"http://127.0.0.1:{port}/")
            page.locator("#prompt textarea").fill(DEFAULT_PROMPT)  # typed as a user would
            page.locator("#send").click()
            page.locator("#status", has_text="Done.").wait_for(timeout=240_000)
            plain = page.locator("#plain-pane .pane-text").inner_text()
            spec = page.locator("#spec-pane .pane-text").inner_text()
            stats = page.locator("#stats").inner_text()
            shot = tmp_path / "demo.png"
            page.screenshot(path=str(shot), full_page=True)
            browser.close()
        assert plain.strip() and plain == spec
        assert "speedup" in stats and "tokens/s" in stats and "outputs identical" in stats
        assert shot.stat().st_size > 10_000
        if os.environ.get("SPECDEC_SCREENSHOT"):
            shutil.copy(shot, os.environ["SPECDEC_SCREENSHOT"])
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
