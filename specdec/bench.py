"""`specdec bench`: specdec's drafters against Hugging Face's own methods, in one process.

Reads Spec-Bench's question format (``question_id``, ``category``, ``turns``); multi-turn
questions run turn by turn through the model's chat template, each method continuing its own
conversation. For every turn all methods run back to back (the order rotates per question, so
no method always runs on a warmer or cooler machine) and every output is compared token by
token with plain greedy ``model.generate``.

Boundary: an edge module (like the CLI and the demo): it may import the core, the drafters and
the model loader; nothing imports it but the CLI and the demo (for `encode_chat`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from specdec import memory
from specdec.decode import GenerationStats
from specdec.devices import clock, device_field, dtype_field
from specdec.drafters.quantized import model_bytes
from specdec.extras import require
from specdec.guard import Guard
from specdec.profile import cpu_name
from specdec.sampling import temperature_kwargs
from specdec.session import Session

HF_METHODS = ("baseline", "hf-prompt-lookup", "hf-assisted")


@dataclass(frozen=True)
class BenchConfig:
    model: str = field(default="smollm2-135m", metadata={"help": "target: embedded name, HF path/id or .gguf file"})
    device: str = device_field()
    dtype: str = dtype_field()
    questions: str = field(default="../shared/data/spec_bench_dev.jsonl", metadata={"help": "Spec-Bench .jsonl file"})
    methods: str = field(
        default="baseline,hf-prompt-lookup,prompt-lookup",
        metadata={
            "help": "comma list: baseline, hf-prompt-lookup, hf-assisted, plain, or any specdec drafter name (options "
                    "in brackets, "
            "composed with + and |, e.g. eagle[full-vocab]+prompt-lookup); "
            "a specdec method with the suffix :stock runs every forward without packed linears, with :noguard "
            "without the no-slowdown guard"
        },
    )
    draft_model: str | None = field(default=None, metadata={"help": "draft model for hf-assisted and draft-model*"})
    quantize_draft: str | None = field(
        default=None,
        metadata={"help": "build one dynamic int8 copy of --draft-model under this scheme (int8, int8-per-tensor, "
                  "int8-smooth: calibrated on the warm-up prompt); draft-model[quantized] drafts with it and "
                  "hf-assisted uses that same object as its assistant"},
    )
    datastore: str | None = field(default=None, metadata={"help": "datastore for the retrieval drafters (default: the "
                                                                  "model's)"})
    max_new_tokens: int = field(default=128, metadata={"help": "new tokens per turn"})
    limit: int | None = field(default=None, metadata={"help": "first N questions only"})
    per_category: int | None = field(default=None, metadata={"help": "first N questions of each category only"})
    categories: str | None = field(default=None, metadata={"help": "comma list of categories to keep"})
    first_turns: bool = field(default=False, metadata={"help": "run only each question's first turn"})
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads"})
    num_tokens: int = field(default=10, metadata={"help": "prompt-lookup draft length (HF's and specdec's)"})
    assistant_tokens: int = field(default=5, metadata={"help": "draft length of HF assisted generation"})
    assistant_confidence: float = field(
        default=0.0, metadata={"help": "HF assisted: stop drafting below this draft confidence (HF's default 0.4)"}
    )
    temperature: float = field(
        default=0.0,
        metadata={"help": "0 = greedy, every output checked token by token against model.generate; > 0 = every "
                  "method samples (transformers' defaults otherwise, top_k 50): outputs are independent draws, not "
                  "compared"},
    )
    guard: bool = field(
        default=True,
        metadata={"help": "specdec methods run with the no-slowdown guard, as generate() does by default (one "
                  "specdec.Guard per method, kept across turns); --no-guard turns it off for every method"},
    )
    packed_from: str = field(
        default="auto",
        metadata={"help": "specdec forwards (the drafters' too) over k >= N tokens use packed linears: 'auto' (each "
                  "model's profiled crossover), 'none', or N (to check packed exactness on a model whose profile "
                  "keeps the stock path)"},
    )
    out: str = field(default="bench-out", metadata={"help": "folder for report.md and results.json"})
    resume: bool = field(
        default=False,
        metadata={"help": "continue the run whose results.json is in --out: keep its records, skip its finished "
                  "questions, run the rest (refused if a setting that changes results differs). Without --resume "
                  "an existing results.json in --out is refused, never overwritten"},
    )


RESUME_FREE = ("out", "resume", "limit", "per_category", "categories", "first_turns")
"""BenchConfig fields a resumed run may change: where it writes and which questions it selects.
Every other field changes records (threads and device change their timings)."""


def parse_packed_from(value: str) -> int | None | str:
    if value in ("auto", "none"):
        return None if value == "none" else value
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        raise ValueError(f"--packed-from: expected 'auto', 'none' or a token count >= 1, got {value!r}")
    return count


@dataclass
class Record:
    question_id: int
    category: str
    turn: int
    method: str
    new_tokens: int
    seconds: float
    forwards: int  # target forwards that produced tokens
    exact: bool  # token-identical to the baseline's output for this turn
    first_mismatch: int | None = None  # index of the first differing new token
    step_tokens: list[int] | None = None  # specdec: tokens committed by each target forward
    split_s: dict | None = None  # specdec: seconds spent in prefill / draft / verify / overhead
    draft_bytes: int | None = None  # weights the method's drafter or assistant holds beyond the target


def read_questions(
    path: str, limit: int | None = None, categories: str | None = None, per_category: int | None = None,
    first_turns: bool = False,
) -> list[dict]:
    """Spec-Bench questions of a .jsonl file, each checked (`check_question`); every refusal names
    the file and line. `first_turns`: each question cut to its first turn."""
    from specdec.drafters.retrieval import read_jsonl

    keep = set(categories.split(",")) if categories else None
    questions = []
    for n, q in read_jsonl(path):
        check_question(q, f"{path}:{n}")
        taken = sum(p["category"] == q["category"] for p in questions)
        if (keep is None or q["category"] in keep) and (per_category is None or taken < per_category):
            questions.append({**q, "turns": q["turns"][:1]} if first_turns else q)
    if keep is not None and not questions:
        raise ValueError(f"--categories {categories}: no question of {path} has these categories")
    return questions[:limit] if limit else questions


def earlier_results(cfg: BenchConfig) -> dict | None:
    """The results.json payload in ``cfg.out`` that this run continues, or None where there is none.
    Refuses one without ``cfg.resume`` (hours of results are never overwritten silently), one that
    is not a bench results file, and one whose config differs in a field outside `RESUME_FREE`,
    naming the field. Reads only: nothing is written until a question finishes."""
    path = Path(cfg.out) / "results.json"
    if not path.is_file():
        return None
    if not cfg.resume:
        raise ValueError(f"--out {cfg.out} already holds results.json; add --resume to continue that run, or pick "
                         "another --out (or delete the file) to start afresh")
    try:
        payload = json.loads(path.read_text())
        old, records = payload["config"], [Record(**r) for r in payload["records"]]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"--resume: {path} is not a specdec bench results file ({err}); move it away") from None
    for name, value in asdict(cfg).items():
        if name not in RESUME_FREE and old.get(name, "(not recorded)") != value:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"--resume: {flag} is {value!r} here but {old.get(name, '(not recorded)')!r} in {path}; "
                             f"rerun with the earlier {flag}, or pick another --out")
    payload["records"] = records
    return payload


def check_same_device(earlier: dict, device: str, cfg: BenchConfig) -> None:
    """Refuse to resume on another machine (or packing): its timings would mix with the earlier ones."""
    if earlier["device"] != device:
        raise ValueError(f"--resume: {cfg.out}/results.json was measured on {earlier['device']!r}, this run is on "
                         f"{device!r}; resume on that machine, or pick another --out")


def finished_records(earlier: list[Record], questions: list[dict], methods: list[str]) -> list[Record]:
    """`earlier`'s records less those of a selected question not recorded for every turn and method
    (it runs again); records of questions outside this run's selection are kept."""
    turns = {q["question_id"]: len(q["turns"]) for q in questions}
    have = defaultdict(set)
    for r in earlier:
        have[r.question_id].add((r.turn, r.method))
    full = {qid for qid, n in turns.items() if have[qid] >= {(t, m) for t in range(n) for m in methods}}
    return [r for r in earlier if r.question_id in full or r.question_id not in turns]


def check_question(q, where: str) -> None:
    """Refuse a question that is not Spec-Bench's shape, naming `where` (file:line): a string
    `turns` would otherwise run every character as its own turn."""
    if not isinstance(q, dict) or q.get("question_id") is None:
        raise ValueError(f"{where}: a Spec-Bench question is an object with question_id, category and turns")
    if not isinstance(q.get("category"), str):
        raise ValueError(f"{where}: category must be a string, got {q.get('category')!r:.60}")
    turns = q.get("turns")
    if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
        raise ValueError(f'{where}: turns must be a non-empty list of non-empty strings, e.g. ["Name a color."], got '
                         f'{turns!r:.60}')


class _ForwardCounter:
    """Counts forwards of the target through the public forward-hook API."""

    def __init__(self, model):
        self.model, self.count = model, 0

    def __enter__(self):
        self.handle = self.model.register_forward_hook(self._hook)
        return self

    def _hook(self, *_):
        self.count += 1

    def __exit__(self, *exc):
        self.handle.remove()


def check_methods(cfg: BenchConfig) -> list[str]:
    """Validate --methods before any model is loaded."""
    from specdec.registry import check_name

    names = cfg.methods.split(",")
    temperature_kwargs(cfg.temperature)  # refuses a negative temperature before anything loads
    parse_packed_from(cfg.packed_from)  # and a --packed-from that is not a crossover
    for name in names:
        base, _, variant = name.partition(":")
        if base not in (*HF_METHODS, "plain"):
            try:
                check_name(base)
            except ValueError as err:
                raise ValueError(f"--methods: {err}; or use one of {', '.join((*HF_METHODS, 'plain'))}") from None
        if variant not in ("", "stock", "noguard") or (variant and base in HF_METHODS):
            raise ValueError(f"--methods: {name!r}: the variants are ':stock' and ':noguard', for specdec methods")
        if (name == "hf-assisted" or "draft-model" in base) and not cfg.draft_model:
            raise ValueError(f"--methods {name} needs --draft-model NAME (e.g. qwen2.5-coder-0.5b)")
        if "draft-model" in base and "quantized" in base and not cfg.quantize_draft:
            raise ValueError(f"--methods {name} needs --quantize-draft SCHEME (e.g. int8)")
    if cfg.quantize_draft is not None:
        from specdec.drafters.quantized import check_scheme

        check_scheme(cfg.quantize_draft, "--quantize-draft")
        if not cfg.draft_model:
            raise ValueError("--quantize-draft needs --draft-model NAME: it quantizes that model")
    if "baseline" not in names:
        raise ValueError("--methods must include baseline: every output is checked against it")
    if len(set(names)) != len(names):
        raise ValueError(f"--methods lists a method twice: {cfg.methods}")
    return names


WARMUP = "Say hello."  # the prompt every method runs once before timing (and int8-smooth calibrates on)


def quantize_draft(cfg: BenchConfig, draft, tokenizer):
    """The one int8 copy of `draft` that --quantize-draft asks for (None without it)."""
    if cfg.quantize_draft is None:
        return None
    from specdec.drafters.quantized import quantized_copy

    calibration = encode_chat(tokenizer, [{"role": "user", "content": WARMUP}])
    return quantized_copy(draft, cfg.quantize_draft, calibration=calibration)


def make_drafters(cfg: BenchConfig, target, draft, quantized=None) -> dict:
    """method name -> its drafter, for the methods that have one; built before any long work
    (`specdec bench` builds them before the one-time cost profiling), so a missing datastore,
    draft model or trained head is refused first. `quantized`: `quantize_draft`'s copy."""
    from specdec.drafters import PromptLookup
    from specdec.registry import Resources, make_drafter

    drafters = {}
    for name in check_methods(cfg):
        base, _, variant = name.partition(":")
        if base in (*HF_METHODS, "plain"):
            continue
        drafter = make_drafter(base, Resources(target, cfg.model, draft, cfg.datastore, quantized))
        if isinstance(drafter, PromptLookup):  # the same draft length as HF's prompt lookup
            drafter = dataclasses.replace(drafter, num_tokens=cfg.num_tokens)
        drafters[name] = drafter
    return drafters


def make_methods(
    cfg: BenchConfig, target, draft, drafters: dict | None = None, quantized=None
) -> dict[str, Callable[[Tensor, int], tuple[Tensor, int, GenerationStats | None]]]:
    """name -> run(prompt [1, t], turn) -> (output [1, t + new], target forwards that produced
    tokens, specdec's per-step stats or None for transformers' methods). specdec methods run each
    question as one `specdec.Session` (turn 0 starts it), so a later turn reuses the cache of the
    earlier ones, as a chat server does; model.generate prefills every turn afresh. `drafters`:
    from `make_drafters` (None: built here). `quantized`: `quantize_draft`'s copy of `draft`, which
    hf-assisted then takes as its assistant."""
    drafters = make_drafters(cfg, target, draft, quantized) if drafters is None else drafters

    def hf(**kwargs):
        def run(ids, turn):
            with _ForwardCounter(target) as counter:
                out = target.generate(
                    ids, attention_mask=torch.ones_like(ids), max_new_tokens=cfg.max_new_tokens,
                    **temperature_kwargs(cfg.temperature), **kwargs,
                )
            return out, counter.count, None  # every HF forward, the prefill included, yields a token

        return run

    packed_from = parse_packed_from(cfg.packed_from)

    def spec(drafter, variant: str):
        stock = variant == "stock"  # every forward stock, the drafter's too: generate(packed_from=None)
        guard = Guard() if cfg.guard and variant != "noguard" else None  # one per method, kept across questions
        session: list[Session] = []

        def run(ids, turn):
            if turn == 0:
                session[:] = [Session(
                    target, drafter, guard=guard, max_new_tokens=cfg.max_new_tokens,
                    packed_from=None if stock else packed_from, **temperature_kwargs(cfg.temperature),
                )]
            stats = GenerationStats()
            out = session[0].generate(ids, stats=stats)
            return out, stats.target_forwards, stats  # the prefill yields no token in specdec

        return run

    methods = {}
    for name in check_methods(cfg):
        base, _, variant = name.partition(":")
        if name == "baseline":
            methods[name] = hf()
        elif name == "hf-prompt-lookup":
            methods[name] = hf(prompt_lookup_num_tokens=cfg.num_tokens)
        elif name == "hf-assisted":
            assistant = draft if quantized is None else quantized
            # transformers reads these from the assistant's own generation config (generate() kwargs
            # are ignored, checked on 5.23); its defaults are 20 tokens with a 0.4 confidence cut-off.
            assistant.generation_config.num_assistant_tokens = cfg.assistant_tokens
            assistant.generation_config.num_assistant_tokens_schedule = "constant"
            assistant.generation_config.assistant_confidence_threshold = cfg.assistant_confidence
            methods[name] = hf(assistant_model=assistant)
        else:
            methods[name] = spec(drafters.get(name), variant)  # plain: no drafter
    return methods


def encode_chat(tokenizer, messages: list[dict]) -> Tensor:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return torch.tensor([tokenizer(text, add_special_tokens=False).input_ids])


def run_bench(
    cfg: BenchConfig,
    target,
    tokenizer,
    draft=None,
    progress: bool = True,
    on_question=None,
    drafters: dict | None = None,
    earlier: list[Record] | None = None,
    questions: list[dict] | None = None,
    quantized=None,
) -> list[Record]:
    """All records; `on_question(records so far)` after each question (for incremental reports);
    `drafters` as `make_methods` takes them. `earlier`: records of an interrupted run (`--resume`),
    kept; its finished questions are skipped, a partly recorded one runs again. `questions`: as
    `read_questions` gives them for `cfg` (None: read here). `quantized`: as `make_methods`."""
    from tqdm.auto import tqdm

    if questions is None:
        questions = read_questions(cfg.questions, cfg.limit, cfg.categories, cfg.per_category, cfg.first_turns)
    methods = make_methods(cfg, target, draft, drafters, quantized)
    assistant_bytes = model_bytes(draft if quantized is None else quantized) if draft is not None else None
    names = list(methods)
    records = finished_records(earlier or [], questions, names)
    done = {r.question_id for r in records}
    if any(q["question_id"] not in done for q in questions):  # nothing to run: no warm-up either
        warm = encode_chat(tokenizer, [{"role": "user", "content": WARMUP}]).to(target.device)
        for run in methods.values():  # first calls pay one-time costs (allocations, kernel selection)
            run(warm, 0)
    for qi, q in enumerate(tqdm(questions, desc="questions", disable=not progress)):
        if q["question_id"] in done:
            continue  # the rotation below stays the uninterrupted run's: qi counts skipped questions too
        order = names[qi % len(names) :] + names[: qi % len(names)]
        history = {name: [] for name in names}
        for turn, text in enumerate(q["turns"]):
            outputs: dict[str, Tensor] = {}
            for name in order:
                history[name].append({"role": "user", "content": text})
                ids = encode_chat(tokenizer, history[name]).to(target.device)  # every method gets them there
                t0 = clock(target.device)
                out, forwards, stats = methods[name](ids, turn)
                seconds = clock(target.device) - t0
                outputs[name] = new = out[0, ids.shape[1] :]
                history[name].append({"role": "assistant", "content": tokenizer.decode(new, skip_special_tokens=True)})
                rec = Record(q["question_id"], q["category"], turn, name, new.numel(), seconds, forwards, True)
                if name == "hf-assisted":
                    rec.draft_bytes = assistant_bytes
                if stats is not None:
                    rec.draft_bytes = stats.draft_bytes
                    rec.step_tokens = [len(step.new_tokens) for step in stats.steps]
                    rec.split_s = {
                        "prefill": stats.prefill_s,
                        "draft": stats.draft_s,
                        "verify": stats.verify_s,
                        "overhead": stats.overhead_s,
                    }
                records.append(rec)
            ref = outputs["baseline"]
            for rec in records[-len(names) :] if cfg.temperature == 0 else []:  # sampled: independent draws
                new = outputs[rec.method]
                n = min(new.numel(), ref.numel())
                diff = torch.nonzero(new[:n] != ref[:n]).flatten()
                if diff.numel() or new.numel() != ref.numel():
                    rec.exact, rec.first_mismatch = False, int(diff[0]) if diff.numel() else n
        if on_question is not None:
            on_question(records)
    return records


FIRST, LATER = "first turns", "later turns"  # summary rows over every category, besides "overall"


def summarize(records: list[Record]) -> dict:
    """Per method, overall, over first and over later turns, and per category: tokens/s, speedup
    over baseline, tokens per forward, mismatches, the most draft memory."""
    groups: dict[tuple[str, str], list[Record]] = defaultdict(list)
    for r in records:
        groups[(r.method, "overall")].append(r)
        groups[(r.method, r.category)].append(r)
        groups[(r.method, FIRST if r.turn == 0 else LATER)].append(r)
    summary: dict = defaultdict(dict)
    for (method, cat), rs in groups.items():
        tokens, seconds = sum(r.new_tokens for r in rs), sum(r.seconds for r in rs)
        summary[method][cat] = {
            "tokens": tokens,
            "seconds": seconds,
            "tokens_per_s": tokens / seconds,
            "tokens_per_forward": tokens / max(1, sum(r.forwards for r in rs)),
            "mismatches": sum(not r.exact for r in rs),
            "turns": len(rs),
            "draft_bytes": max((r.draft_bytes or 0 for r in rs), default=0),
        }
        if all(r.split_s is not None for r in rs):  # specdec methods: where the time went
            summary[method][cat]["split_s"] = {k: sum(r.split_s[k] for r in rs) for k in rs[0].split_s}
    for method, cats in summary.items():
        for cat, row in cats.items():
            row["speedup"] = row["tokens_per_s"] / summary["baseline"][cat]["tokens_per_s"]
    return dict(summary)


def report(summary: dict, cfg: BenchConfig, device: str, resumed: int = 0) -> str:
    methods = list(summary)
    cats = _categories(summary)
    turns = summary["baseline"]["overall"]["turns"]
    decoding = "greedy" if cfg.temperature == 0 else f"sampled at temperature {cfg.temperature}"
    decoding += ", specdec with the no-slowdown guard" if cfg.guard else ""
    decoding += "; specdec runs each question as one Session (later turns reuse the cache of earlier ones)"
    checked = (
        "Mismatches count turns whose tokens differ from `model.generate`." if cfg.temperature == 0
        else "Sampled outputs are independent draws and are not compared (mismatches column: not checked)."
    )
    lines = [
        f"# specdec bench: {cfg.model}" + (f" (draft: {cfg.draft_model})" if cfg.draft_model else ""),
        "",
        f"{turns} turns, {decoding}, max {cfg.max_new_tokens} new tokens, {device}, "
        f"{torch.get_num_threads()} threads. {checked}",
        "",
        *([f"{resumed} question(s) resumed from an earlier run's results.json (--resume): their timings come from "
           "that process.", ""] if resumed else []),
        f"Peak resident memory of the process: {memory.size(memory.peak_rss())}; draft memory: what a method's "
        "drafter (or HF's assistant) holds beyond the target.",
        "",
        "| method | tokens/s | speedup | first turns | later turns | tokens per target forward | draft memory | "
        "mismatches |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in methods:
        o, turn_rows = summary[m]["overall"], [summary[m].get(k) for k in (FIRST, LATER)]
        lines.append(
            f"| {m} | {o['tokens_per_s']:.2f} | {o['speedup']:.2f}x | "
            + " | ".join(f"{t['speedup']:.2f}x" if t else "-" for t in turn_rows)
            + f" | {o['tokens_per_forward']:.2f} | {memory.size(o['draft_bytes']) if o['draft_bytes'] else '-'} | "
            + (f"{o['mismatches']}/{o['turns']} |" if cfg.temperature == 0 else "not checked |")
        )
    lines += ["", "Speedup (tokens per target forward) per category:", ""]
    lines += ["| category | " + " | ".join(methods) + " |", "|---|" + "---:|" * len(methods)]
    for c in cats:
        cells = [f"{summary[m][c]['speedup']:.2f}x ({summary[m][c]['tokens_per_forward']:.2f})" for m in methods]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    split = [m for m in methods if "split_s" in summary[m]["overall"]]
    if split:
        lines += ["", "Where specdec's time goes (share of each method's total):", ""]
        lines += ["| method | prefill | draft | verify | overhead |", "|---|---:|---:|---:|---:|"]
        for m in split:
            parts = summary[m]["overall"]["split_s"]
            total = sum(parts.values()) or 1.0
            lines.append(
                f"| {m} | "
                + " | ".join(f"{100 * parts[k] / total:.0f}%" for k in ("prefill", "draft", "verify", "overhead"))
                + " |"
            )
    lines += ["", "![speedup per category](speedup.png)", "", "![tokens per target forward](accepted.png)"]
    return "\n".join(lines) + "\n"


def _categories(summary: dict) -> list[str]:
    """The summary's rows below "overall": first and later turns, then each category by name."""
    rows = {c for m in summary.values() for c in m if c != "overall"}
    return [k for k in (FIRST, LATER) if k in rows] + sorted(rows - {FIRST, LATER})


def write_plots(records: list[Record], summary: dict, out: Path) -> None:
    """speedup.png (per category and method) and accepted.png (histogram of tokens per target
    forward for specdec methods); written to temp files and renamed like the rest."""
    require("matplotlib", "bench").use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    methods = [m for m in summary if m != "baseline"]
    cats = _categories(summary) + ["overall"]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(cats) * max(1, len(methods)) / 2), 3.6))
    width = 0.8 / max(1, len(methods))
    for i, m in enumerate(methods):
        xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(cats))]
        ax.bar(xs, [summary[m][c]["speedup"] for c in cats], width, label=m)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(cats)), cats, rotation=20, ha="right")
    ax.set_ylabel("speedup over model.generate")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    _atomic_figure(fig, out / "speedup.png")

    spec = {m: [n for r in records if r.method == m and r.step_tokens for n in r.step_tokens] for m in methods}
    spec = {m: v for m, v in spec.items() if v}
    fig, ax = plt.subplots(figsize=(6, 3.2))
    if spec:
        top = max(max(v) for v in spec.values())
        bins = [b + 0.5 for b in range(top + 1)]
        for m, values in spec.items():
            ax.hist(values, bins=bins, histtype="step", linewidth=1.5, density=True, label=m)
        ax.legend(fontsize=7)
    ax.set_xlabel("tokens committed per target forward")
    ax.set_ylabel("share of steps")
    fig.tight_layout()
    _atomic_figure(fig, out / "accepted.png")


def _atomic_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    except BaseException:  # Ctrl-C included: no half-written file is left behind
        os.unlink(tmp)
        raise
    finally:
        plt.close(fig)


def describe_device(model) -> str:
    dtype = str(model.dtype).removeprefix("torch.")
    if model.device.type == "cuda":
        return f"{torch.cuda.get_device_name(model.device)} ({model.device}), {dtype}"
    return f"CPU {cpu_name()}, {dtype}"


def write_results(
    records: list[Record], cfg: BenchConfig, out_dir: str, device: str, plots: bool = True, resumed: int = 0
) -> str:
    """report.md and results.json, and with `plots` the two PNGs (matplotlib takes a second or
    two, so a run's per-question partial reports skip them); `resumed`: questions whose records
    came from an earlier process (`--resume`)."""
    summary = summarize(records)
    text = report(summary, cfg, device, resumed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"config": asdict(cfg), "device": device, "summary": summary, "records": [asdict(r) for r in records]}
    _atomic_write(out / "results.json", json.dumps(payload, indent=1))
    if plots:
        write_plots(records, summary, out)
    _atomic_write(out / "report.md", text)
    return text


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    except BaseException:  # Ctrl-C included: no half-written file is left behind
        tmp.unlink(missing_ok=True)
        raise
