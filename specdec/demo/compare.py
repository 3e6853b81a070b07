"""The side-by-side comparison without any UI: time both decoders, then replay them at their pace.

Honest timing: `trace_plain` (``model.generate``) and `trace_spec` (`specdec.generate`) run one
after the other, each with the whole machine, and record when every token became available (a
run ends when the model's device has finished, `specdec.devices.clock`).
`frame` then cuts both traces at the same elapsed time, so a UI that replays frames on a real
clock shows each side exactly as fast as it ran.

Boundary: edge code (imports the core and nothing from gradio); `specdec.demo.app` renders it.
"""

from __future__ import annotations

import html
import time
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers.generation.streamers import BaseStreamer

from specdec.decode import GenerationStats, generate
from specdec.devices import clock
from specdec.sampling import temperature_kwargs

DRAFT, TARGET = "draft", "target"


@dataclass(frozen=True)
class Piece:
    t: float  # seconds after the run started at which these tokens existed
    tokens: tuple[int, ...]
    source: str  # DRAFT: proposed by the drafter and accepted; TARGET: the target's own token


@dataclass(frozen=True)
class Trace:
    pieces: tuple[Piece, ...]
    seconds: float  # the whole run, prefill included
    steps: int  # target forwards that produced tokens

    @property
    def tokens(self) -> list[int]:
        return [t for p in self.pieces for t in p.tokens]

    @property
    def tokens_per_s(self) -> float:
        return len(self.tokens) / self.seconds if self.seconds > 0 else 0.0

    @property
    def mean_accepted(self) -> float:
        """Tokens per target forward (1.0 for plain decoding)."""
        return len(self.tokens) / max(1, self.steps)


class _TimedStreamer(BaseStreamer):
    """Records when ``model.generate`` emits each token (its first `put` is the prompt)."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.pieces: list[Piece] = []
        self.seen_prompt = False

    def put(self, value: Tensor) -> None:
        if not self.seen_prompt:
            self.seen_prompt = True
            return
        self.pieces.append(Piece(time.perf_counter() - self.t0, tuple(value.flatten().tolist()), TARGET))

    def end(self) -> None:
        pass


def trace_plain(model, input_ids: Tensor, max_new_tokens: int, temperature: float = 0.0) -> Trace:
    input_ids = input_ids.to(model.device)
    streamer = _TimedStreamer()
    model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        streamer=streamer,
        **temperature_kwargs(temperature),
    )
    seconds = clock(model.device) - streamer.t0
    return Trace(tuple(streamer.pieces), seconds, len(streamer.pieces))


def trace_spec(model, input_ids: Tensor, drafter, max_new_tokens: int, temperature: float = 0.0) -> Trace:
    pieces: list[Piece] = []
    t0 = clock(model.device)

    def on_step(step) -> None:
        t = time.perf_counter() - t0
        n_draft = len(step.accepted_nodes)
        if step.new_tokens[:n_draft]:
            pieces.append(Piece(t, tuple(step.new_tokens[:n_draft]), DRAFT))
        if step.new_tokens[n_draft:]:
            pieces.append(Piece(t, tuple(step.new_tokens[n_draft:]), TARGET))

    stats = GenerationStats()
    generate(
        model,
        input_ids,
        drafter,
        max_new_tokens=max_new_tokens,
        stats=stats,
        on_step=on_step,
        **temperature_kwargs(temperature),
    )
    return Trace(tuple(pieces), clock(model.device) - t0, stats.target_forwards)


def warm_up(model) -> None:
    """One short run of each path, so that the first timed answer is not charged for one-time
    costs (lazy kernel set-up, packing the weights) and a comparison stays fair."""
    from specdec.drafters import PromptLookup

    ids = torch.tensor([[1, 2, 3, 1, 2, 3, 1, 2]])  # valid ids in any vocabulary; repeats give drafts
    trace_plain(model, ids, 4)
    trace_spec(model, ids, PromptLookup(), 8)


def frame(trace: Trace, t: float) -> list[Piece]:
    """The pieces that existed `t` seconds into the run."""
    return [p for p in trace.pieces if p.t <= t]


def accepted_per_step(trace: Trace) -> list[int]:
    """Tokens committed by each target forward, in order (pieces of one step share a time)."""
    lengths: dict[float, int] = {}
    for p in trace.pieces:
        lengths[p.t] = lengths.get(p.t, 0) + len(p.tokens)
    return list(lengths.values())


def texts(pieces: list[Piece], tokenizer) -> list[tuple[str, str]]:
    """(text, source) per piece. Decoding the growing prefix keeps multi-token characters whole."""
    out, ids, prev = [], [], ""
    for p in pieces:
        ids.extend(p.tokens)
        full = tokenizer.decode(ids, skip_special_tokens=True)
        # A prefix decode can end in half a character that the next token completes; the text
        # added is then whatever follows the common prefix.
        common = (
            len(prev) if full.startswith(prev) else next((i for i, (a, b) in enumerate(zip(prev, full)) if a != b), 0)
        )
        out.append((full[common:], p.source))
        prev = full
    return out


COLOURS = {DRAFT: "#b7e4c7", TARGET: "transparent"}


def render(pieces: list[Piece], tokenizer, colour: bool) -> str:
    """HTML for a pane; with `colour`, draft-accepted text is highlighted."""
    spans = []
    for text, source in texts(pieces, tokenizer):
        style = f"background:{COLOURS[source]}" if colour and source == DRAFT else ""
        spans.append(f'<span class="{source}" style="{style}">{html.escape(text)}</span>')
    return '<div class="pane-text" style="white-space:pre-wrap">' + "".join(spans) + "</div>"


def bar_svg(values: list[int], width: int = 360, height: int = 80) -> str:
    """A tiny inline bar chart of accepted tokens per step (no plotting library needed)."""
    if not values:
        return ""
    top, bar = max(values), width / len(values)
    rects = "".join(
        f'<rect x="{i * bar:.1f}" y="{height - v / top * (height - 12):.1f}" width="{max(bar - 1, 1):.1f}" '
        f'height="{v / top * (height - 12):.1f}" fill="#2d6a4f"><title>step {i + 1}: {v}</title></rect>'
        for i, v in enumerate(values)
    )
    return (
        f'<svg class="accepted-plot" width="{width}" height="{height}" role="img" '
        f'aria-label="tokens per target forward, per step">{rects}'
        f'<text x="2" y="10" font-size="10">max {top} tokens/step</text></svg>'
    )


@dataclass(frozen=True)
class LiveStats:
    plain_tokens_per_s: float
    spec_tokens_per_s: float
    speedup: float | None  # final: plain time / specdec time; None until both finished
    mean_accepted: float


def live_stats(plain: Trace, spec: Trace, t: float) -> LiveStats:
    """What the page shows `t` seconds into the replay."""
    def rate(trace: Trace) -> float:
        done = frame(trace, t)
        if t >= trace.seconds:
            return trace.tokens_per_s
        return sum(len(p.tokens) for p in done) / t if t > 0 else 0.0

    shown = frame(spec, t)
    steps = len({p.t for p in shown})
    mean = sum(len(p.tokens) for p in shown) / steps if steps else 0.0
    finished = t >= max(plain.seconds, spec.seconds)
    speedup = plain.seconds / spec.seconds if finished and spec.seconds > 0 else None
    return LiveStats(rate(plain), rate(spec), speedup, mean)
