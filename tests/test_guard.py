"""The no-slowdown guard: a slow useless drafter gets paused, a good one keeps drafting, outputs stay exact."""

from __future__ import annotations

import time

import pytest
import torch

import specdec
from conftest import random_prompt, reference, tiny_model
from specdec import Guard
from specdec.trees import TokenTree


class Scripted:
    """Proposes `tokens(ctx)` after sleeping `delay` seconds; counts its calls."""

    needs_hidden_states = False

    def __init__(self, tokens, delay: float = 0.0):
        self.tokens, self.delay, self.calls = tokens, delay, 0

    def begin(self, target) -> None:
        pass

    def propose(self, ctx):
        self.calls += 1
        time.sleep(self.delay)
        return TokenTree.chain(self.tokens(ctx))

    def update(self, feedback) -> None:
        pass


def test_guard_pauses_a_slow_useless_drafter_and_stays_exact():
    model = tiny_model()
    prompt = random_prompt(4, 12)
    ref = reference(model, prompt, 60)
    # never the next token
    wrong = Scripted(lambda ctx: [(int(ref[0, ctx.input_ids.numel()]) + 1) % 95] * 3, delay=0.02)
    guard = Guard(probe_every=4, pause=8)
    out = specdec.generate(model, prompt, wrong, max_new_tokens=60, guard=guard)
    assert torch.equal(out, ref)
    assert wrong.calls < 30  # without the guard: 59 proposals


def test_guard_keeps_a_good_drafter_drafting():
    model = tiny_model()
    prompt = random_prompt(5, 12)
    ref = reference(model, prompt, 60)
    oracle = Scripted(lambda ctx: ref[0, ctx.input_ids.numel() : ctx.input_ids.numel() + 4].tolist())
    # The guard judges wall time; a process's first tree verification pays one-time costs (over
    # 100x a later step on this tiny model) that would fail the first window, as they should.
    specdec.generate(model, prompt, oracle, max_new_tokens=8, guard=None)
    stats = specdec.GenerationStats()
    out = specdec.generate(model, prompt, oracle, max_new_tokens=60, guard=Guard(probe_every=4), stats=stats)
    assert torch.equal(out, ref)
    drafted = sum(len(s.tree) > 0 for s in stats.steps)
    assert drafted >= len(stats.steps) - 3  # at most the forced probes and the last step are plain
    assert stats.mean_accepted > 3


def test_guard_pause_doubles_and_is_validated():
    guard = Guard(probe_every=2, pause=3)
    guard.record(False, 1, 0.01)  # plain: 10 ms per token
    for _ in range(2):
        guard.record(True, 1, 0.05)  # speculation: 50 ms per token
    assert not guard.speculate()
    for _ in range(3):
        guard.record(False, 1, 0.01)
    assert guard.speculate()
    for _ in range(2):
        guard.record(True, 1, 0.05)
    paused = 0
    while not guard.speculate():
        guard.record(False, 1, 0.01)
        paused += 1
    assert paused == 6  # the second consecutive failure pauses twice as long
    with pytest.raises(ValueError, match="Guard"):
        Guard(alpha=0)


def test_guard_rates_are_seconds_over_tokens():
    """Speculating alternates 1-token and 4-token steps of 0.1 s: 0.04 s per token, faster than
    plain decoding's 0.05 (a mean of per-step rates, 0.0625, would call it slower)."""
    guard = Guard(probe_every=4, alpha=0.1)
    guard.record(False, 1, 0.05)
    for i in range(40):
        assert guard.speculate()
        guard.record(True, 1 if i % 2 else 4, 0.1)
    assert guard.spec_s == pytest.approx(0.04, rel=0.1) and guard.speculate()
    for _ in range(10):  # now every step commits one token in 0.1 s: twice plain's time
        guard.record(True, 1, 0.1)
    assert not guard.speculate()


def test_guard_fails_a_plainly_losing_window_early():
    """Three times slower than plain: paused after 3 steps, not probe_every. 1.5 times slower (under
    early_fail): judged only at probe_every, and paused then."""
    for seconds, steps in ((0.03, 3), (0.015, 8)):  # plain: 0.01 s per token
        guard = Guard(probe_every=8)
        guard.record(False, 1, 0.01)
        for _ in range(steps):
            assert guard.speculate()
            guard.record(True, 1, seconds)
        assert not guard.speculate()
    with pytest.raises(ValueError, match="early_fail"):
        Guard(early_fail=0.5)


def test_a_new_request_ends_the_pause_but_not_the_record():
    """A long pause ends with the request; the plain reference and the failure count carry over: a
    drafter that failed last waits for its backoff, at most `request_wait` steps; one that passed
    drafts at once."""
    guard = Guard(probe_every=2, pause=64, request_wait=5)
    guard.record(False, 1, 0.01)
    for _ in range(2):
        guard.record(True, 1, 0.05)
    assert not guard.speculate()
    guard.begin()
    assert guard.plain_s == pytest.approx(0.01)
    for _ in range(5):  # min(request_wait, backoff) plain steps before the first probe
        assert not guard.speculate()
        guard.record(False, 1, 0.01)
    assert guard.speculate()
    for _ in range(2):  # this request's window passes: the next request drafts at once
        guard.record(True, 2, 0.01)
    guard.begin()
    assert guard.speculate()
    short = Guard(probe_every=2, pause=3)  # a backoff shorter than request_wait is waited in full
    short.record(False, 1, 0.01)
    for _ in range(2):
        short.record(True, 1, 0.05)
    short.begin()
    waited = 0
    while not short.speculate():
        short.record(False, 1, 0.01)
        waited += 1
    assert waited == 3
    with pytest.raises(ValueError, match="request_wait"):
        Guard(request_wait=-1)
