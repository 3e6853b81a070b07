"""The gradio page: one chat box, plain ``model.generate`` and specdec side by side.

Each answer is produced twice, one run after the other so each has the whole machine, then both
are replayed side by side on a real clock at the pace they ran (`specdec.demo.compare`). The
specdec pane highlights tokens that were drafted and accepted; plain text came from the target.

Boundary: edge code. Strings from the page become objects here (model names through
`specdec.models`, drafter names through `specdec.registry`); errors become a message in
the page, never a stack trace. `build_demo()` returns the Blocks; only the CLI launches it.
"""

from __future__ import annotations

import html
import time
from collections.abc import Callable, Iterator

from specdec.demo.compare import (
    Trace,
    accepted_per_step,
    bar_svg,
    frame,
    live_stats,
    render,
    trace_plain,
    trace_spec,
    warm_up,
)

DEFAULT_PROMPT = (
    "Fix the typos in this text and return it in full: 'The quick brwon fox jumpd over the lazzy dog. "
    "The dog was sleepping in the sun, and the fox ran quikly into the forrest where it lived with its famly.'"
)
# Drafters that need a second, smaller model get it from here (same tokenizer as the target).
DRAFT_MODEL_FOR = {"qwen2.5-coder-1.5b": "qwen2.5-coder-0.5b"}
REPLAY_FPS = 20
HONESTY = (
    "Both answers are computed one after the other, each with the whole machine to itself, then "
    "replayed side by side at the pace each really ran. Highlighted text was proposed by the drafter "
    "and accepted by the target; the rest is the target's own tokens. At temperature 0 (greedy) the two "
    "texts must be identical; above it both sides sample from the same distribution (specdec's "
    "speculative sampling is lossless), so the texts are different draws."
)


class DemoError(ValueError):
    """A problem to show in the page (bad choice, model not installed, ...)."""


def _stats_markdown(plain: Trace, spec: Trace, t: float, sampled: bool) -> str:
    s = live_stats(plain, spec, t)
    speedup = f"**{s.speedup:.2f}x**" if s.speedup is not None else "…"
    same = ""
    if s.speedup is not None and sampled:
        same = " · sampled: same distribution, independent draws"
    elif s.speedup is not None:
        same = " · outputs identical" if plain.tokens == spec.tokens else " · **outputs differ**"
    return (
        f"model.generate: **{s.plain_tokens_per_s:.1f}** tokens/s · specdec: **{s.spec_tokens_per_s:.1f}** "
        f"tokens/s · speedup {speedup} · mean accepted tokens per target forward: **{s.mean_accepted:.2f}**{same}"
    )


class Session:
    """Loaded models and drafters, shared by every request of one app."""

    def __init__(self, load_model: Callable):
        self._load = load_model
        self._models: dict[str, tuple] = {}

    def model(self, name: str):
        if name not in self._models:
            try:
                loaded = self._load(name)
            except (OSError, ValueError, ImportError) as err:  # ModelNotInstalledError is an OSError
                raise DemoError(f"Could not load model {name!r}: {err}") from err
            warm_up(loaded[0])
            self._models[name] = loaded
        return self._models[name]

    def drafter(self, name: str, target: str, budget: int):
        from specdec.registry import DRAFTERS, Resources, make_drafter

        if name not in DRAFTERS:
            raise DemoError(f"Unknown drafter {name!r}; choose one of {', '.join(DRAFTERS)}")
        draft = None
        if "draft-model" in name:
            if target not in DRAFT_MODEL_FOR:
                raise DemoError(
                    f"The {name} drafter needs a smaller model with the same tokenizer; "
                    f"choose the target {', '.join(DRAFT_MODEL_FOR)} or another drafter."
                )
            draft = self.model(DRAFT_MODEL_FOR[target])[0]
        if budget and "budget" in DRAFTERS[name].options:  # a tree budget of 0 keeps the drafter's default
            name = f"{name}[budget={int(budget)}]"
        return make_drafter(name, Resources(self.model(target)[0], target, draft))


def respond(session: Session, message: str, history: list[dict], model_name: str, drafter_name: str,
            max_new_tokens: int, budget: int, temperature: float = 0.0, realtime: bool = True) -> Iterator[tuple]:
    """Yields (chat, history, plain_html, spec_html, stats_md, plot_html, status_md) frames."""
    from specdec.bench import encode_chat

    history = list(history or [])
    message = (message or "").strip()

    def status_only(chat: list[dict], text: str) -> tuple:
        return (chat, history, "", "", "", "", text)

    if not message:
        yield status_only(history, "Type a message first.")
        return
    try:
        model, tokenizer = session.model(model_name)
        drafter = session.drafter(drafter_name, model_name, budget)
        turn = history + [{"role": "user", "content": message}]
        ids = encode_chat(tokenizer, turn)
        yield status_only(turn, "Running `model.generate` (alone on the machine)…")
        temperature = float(temperature or 0.0)
        plain = trace_plain(model, ids, int(max_new_tokens), temperature)
        yield status_only(turn, "Running specdec (alone on the machine)…")
        spec = trace_spec(model, ids, drafter, int(max_new_tokens), temperature)
    except DemoError as err:
        yield status_only(history, f"**Error:** {html.escape(str(err))}")
        return
    except Exception as err:  # noqa: BLE001 - the page must keep serving and say what went wrong
        yield status_only(history, f"**Error:** {type(err).__name__}: {html.escape(str(err))}")
        return

    answer = tokenizer.decode(spec.tokens, skip_special_tokens=True)  # the conversation continues from specdec's
    end = max(plain.seconds, spec.seconds)
    start = time.perf_counter()
    while True:
        t = time.perf_counter() - start if realtime else end
        done = t >= end
        t = min(t, end)
        shown = frame(spec, t)
        steps = accepted_per_step(Trace(tuple(shown), spec.seconds, 0))
        chat = turn + [{"role": "assistant", "content": answer}] if done else turn
        yield (
            chat,
            chat if done else history,
            render(frame(plain, t), tokenizer, colour=False),
            render(shown, tokenizer, colour=True),
            _stats_markdown(plain, spec, t, sampled=temperature > 0),
            bar_svg(steps),
            "Done." if done else "Replaying both runs at their measured pace…",
        )
        if done:
            return
        time.sleep(1 / REPLAY_FPS)


def build_demo(*, load_model: Callable | None = None, default_model: str = "smollm2-135m", preload: bool = False):
    """The gradio Blocks (not launched). `load_model(name) -> (model, tokenizer)` defaults to
    `specdec.models.load_model`; `preload` loads and warms up `default_model` now."""
    from specdec.extras import require
    from specdec.models import EMBEDDED
    from specdec.models import load_model as default_loader
    from specdec.registry import DRAFTERS

    gr = require("gradio", "demo")
    session = Session(load_model or default_loader)
    if preload:
        session.model(default_model)
    with gr.Blocks(title="specdec: plain vs speculative decoding") as demo:
        gr.Markdown("# specdec — plain `model.generate` vs speculative decoding, side by side\n" + HONESTY)
        with gr.Row():
            model_name = gr.Dropdown(list(EMBEDDED), value=default_model, label="model", elem_id="model")
            drafter_name = gr.Dropdown(list(DRAFTERS), value="prompt-lookup", label="drafter", elem_id="drafter")
            max_new = gr.Slider(8, 512, value=128, step=8, label="max new tokens", elem_id="max-new-tokens")
            budget = gr.Slider(0, 64, value=0, step=1, label="tree budget (0 = drafter default)", elem_id="budget")
            temperature = gr.Slider(
                0.0, 1.5, value=0.0, step=0.05, label="temperature (0 = greedy)", elem_id="temperature"
            )
        chat = gr.Chatbot(label="conversation", height=220, elem_id="chat")
        history = gr.State([])
        with gr.Row():
            prompt = gr.Textbox(value=DEFAULT_PROMPT, label="message", lines=3, scale=5, elem_id="prompt")
            send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
            clear = gr.Button("New chat", scale=1, elem_id="clear")
        status = gr.Markdown("", elem_id="status")
        stats = gr.Markdown("", elem_id="stats")
        with gr.Row():
            with gr.Column():
                gr.Markdown("### model.generate")
                plain_pane = gr.HTML(elem_id="plain-pane")
            with gr.Column():
                gr.Markdown("### specdec")
                spec_pane = gr.HTML(elem_id="spec-pane")
                plot = gr.HTML(elem_id="accepted-plot")

        def run(message, hist, model_value, drafter_value, max_value, budget_value, temperature_value):
            yield from respond(
                session, message, hist, model_value, drafter_value, max_value, budget_value, temperature_value
            )

        send.click(
            run,
            inputs=[prompt, history, model_name, drafter_name, max_new, budget, temperature],
            outputs=[chat, history, plain_pane, spec_pane, stats, plot, status],
        )
        clear.click(
            lambda: ([], [], "", "", "", "", ""), outputs=[chat, history, plain_pane, spec_pane, stats, plot, status]
        )
    return demo
