"""The `specdec` command: ``specdec generate``, ``bench``, ``profile``, ``demo``, ``datastore`` and ``export``.

Boundary: the edge where strings become objects (model names through `specdec.models`, drafter
names through `specdec.registry`). Arguments are derived from frozen dataclasses.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import types
import typing
from dataclasses import dataclass, field

from specdec.bench import BenchConfig
from specdec.devices import device_field, dtype_field
from specdec.drafters import eagle3_formats
from specdec.drafters.medusa_formats import export_medusa_vllm


@dataclass(frozen=True)
class GenerateConfig:
    prompt: str = field(metadata={"help": "the user message (or raw text with --no-chat)", "positional": True})
    model: str = field(default="smollm2-135m", metadata={"help": "target: embedded name, HF path/id or .gguf file"})
    device: str = device_field()
    dtype: str = dtype_field()
    drafter: str = field(default="prompt-lookup", metadata={
        "help": "drafter name, with options in brackets (eagle[full-vocab], prompt-lookup-tree[budget=32]), composed "
                "with + (merge trees) and | (fallback), e.g. prompt-lookup+token-recycling; 'none' for plain decoding"})
    draft_model: str | None = field(default=None, metadata={"help": "draft model for draft-model* drafters"})
    datastore: str | None = field(default=None, metadata={"help": "datastore for the retrieval drafters (default: the "
                                                                  "model's, see `specdec datastore build`)"})
    max_new_tokens: int = field(default=256, metadata={"help": "most new tokens"})
    chat: bool = field(default=True, metadata={"help": "wrap the prompt in the model's chat template; --no-chat feeds "
                                                       "it as raw text"})
    compare: bool = field(default=False, metadata={"help": "also run model.generate: report speedup, check identity"})
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy; above 0 samples (lossless), as "
                                                              "model.generate would"})
    seed: int | None = field(default=None, metadata={"help": "seed for sampling (reproducible runs)"})
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads"})


@dataclass(frozen=True)
class ProfileConfig:
    model: str = field(default="smollm2-135m", metadata={"help": "target: embedded name, HF path/id or .gguf file"})
    device: str = device_field()
    dtype: str = dtype_field()
    ks: str = field(default="1,2,3,4,6,8,12,16,24,32,48,64", metadata={"help": "comma list of token counts k"})
    context: int = field(default=300, metadata={"help": "cached tokens before the k new ones"})
    repeats: int = field(default=5, metadata={"help": "timed forwards per k (the median is kept)"})
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads"})


@dataclass(frozen=True)
class DemoConfig:
    model: str = field(default="smollm2-135m", metadata={"help": "the model selected when the page opens"})
    device: str = device_field()
    dtype: str = dtype_field()
    host: str = field(default="127.0.0.1", metadata={"help": "address to serve on (0.0.0.0 for every interface)"})
    port: int = field(default=7860, metadata={"help": "port to serve on"})
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads"})


@dataclass(frozen=True)
class DatastoreConfig:
    action: str = field(
        metadata={"help": "build: tokenize a corpus and write a retrieval datastore", "positional": True}
    )
    model: str = field(default="smollm2-135m", metadata={"help": "the target whose tokenizer is used: embedded name, "
                                                                 "HF path/id or .gguf"})
    corpus: str | None = field(default=None, metadata={"help": "required: .jsonl (one record a line) or .txt "
                                                               "(blank-line-separated documents)"})
    out: str | None = field(default=None, metadata={"help": "datastore directory (an existing datastore there is "
                                                            "replaced); default: the model's default datastore, which "
                                                            "the retrieval drafter finds without --datastore"})
    limit: int | None = field(default=None, metadata={"help": "read at most this many records"})
    chat: bool = field(default=False, metadata={"help": "a record is one conversation (user, assistant, ... turns) in "
                                                        "the chat template"})
    # Last: the name shadows dataclasses.field for the rest of the class body.
    field: str = field(default="text", metadata={"help": "comma list of .jsonl fields to read (string or "
                                                         "list-of-strings values)"})


@dataclass(frozen=True)
class ExportConfig:
    model: str = field(default="smollm2-135m", metadata={"help": "target: embedded name, HF path/id or .gguf file"})
    kind: str = field(default="medusa", metadata={"help": "the trained drafter to export: medusa or eagle3"})
    format: str = field(default="vllm", metadata={"help": "the layout to write: vllm (--kind medusa); specforge "
                                                          "(SGLang, vLLM) or speculators (vllm serve DIR) for eagle3"})
    output_dir: str | None = field(default=None, metadata={"help": "required: the directory to write"})
    drafter_dir: str | None = field(default=None, metadata={"help": "a specdec checkpoint directory; unset: the "
                                                                    "drafter of --kind shipped for --model"})
    dtype: str = field(default="float32", metadata={"help": "the target loads, and the tensors are written, in this "
                                                            "dtype: float32, bfloat16, float16 or float64"})
    overwrite: bool = field(default=False, metadata={"help": "replace a non-empty --output-dir"})
    verifier: str | None = field(default=None, metadata={"help": "speculators: the target's HF id or path that vLLM "
                                                                 "serves with the head (default: where --model loaded "
                                                                 "from)"})


# (kind, format) -> writer(drafter, directory): `specdec export` loads the drafter of `kind`
# (`specdec.drafters.TRAINED`) and hands it to the writer. New formats are new rows.
EXPORTERS = {
    ("medusa", "vllm"): lambda drafter, out, verifier=None: export_medusa_vllm(drafter, out),
    ("eagle3", "specforge"): eagle3_formats.exporter(eagle3_formats.SPECFORGE),
    ("eagle3", "speculators"): eagle3_formats.exporter(eagle3_formats.SPECULATORS),
}


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """One option per field: `--snake-case` names, types from the annotations, help from metadata.
    A bool field is named positively (``chat``, not ``no_chat``): it becomes ``--chat/--no-chat``."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if isinstance(kind, types.UnionType):  # `int | None` -> int
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        help_text = f.metadata.get("help", "")
        if f.metadata.get("positional"):
            parser.add_argument(f.name, type=kind, help=help_text)
        elif kind is bool:
            parser.add_argument(  # --flag / --no-flag
                "--" + f.name.replace("_", "-"),
                action=argparse.BooleanOptionalAction,
                default=f.default,
                help=help_text,
            )
        else:
            parser.add_argument(
                "--" + f.name.replace("_", "-"),
                type=kind,
                default=f.default,
                help=help_text + f" (default: {f.default})",
            )


def _setup(threads: int | None) -> None:
    """Every subcommand's first step: the thread count (refused below 1), quiet HF logging."""
    import torch
    from transformers.utils import logging

    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads} (leave it out for torch's default)")
    if threads is not None:
        torch.set_num_threads(threads)
    logging.set_verbosity_error()  # HF's per-call generation-flag warnings would drown the output


def _check_utf8(prompt: str) -> None:
    """Refuse a prompt with bytes that were not UTF-8 (Python keeps such argv bytes as lone
    surrogates, which the tokenizer rejects with a TypeError)."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"the prompt is not valid UTF-8 (an undecodable byte at character {err.start + 1}); "
                         "pass UTF-8 text (check the terminal's encoding, e.g. LANG=C.UTF-8)") from None


def _line_streamer(tokenizer):
    """A TextStreamer (stdout) that knows whether its text left a line open, so Ctrl-C can end it."""
    from transformers import TextStreamer

    class LineStreamer(TextStreamer):
        open_line = False

        def on_finalized_text(self, text: str, stream_end: bool = False):
            super().on_finalized_text(text, stream_end)
            if text or stream_end:
                self.open_line = not stream_end and not text.endswith("\n")

    return LineStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def _placement(cfg) -> dict:
    """`load_model`'s device and dtype from a config's --device / --dtype (refused before any loading)."""
    from specdec.devices import parse_device, parse_dtype

    return {"device": parse_device(cfg.device), "dtype": parse_dtype(cfg.dtype)}


def cmd_generate(cfg: GenerateConfig) -> int:
    import torch

    from specdec.decode import GenerationStats, generate
    from specdec.models import load_model
    from specdec.registry import Resources, check_name, make_drafter
    from specdec.sampling import temperature_kwargs

    placement = _placement(cfg)
    _setup(cfg.threads)
    _check_utf8(cfg.prompt)
    if cfg.drafter != "none":
        check_name(cfg.drafter)
    model, tokenizer = load_model(cfg.model, **placement)
    draft = load_model(cfg.draft_model, **placement)[0] if cfg.draft_model else None
    resources = Resources(model, cfg.model, draft, cfg.datastore)
    # Before the one-time profiling: a missing datastore, draft model or trained head fails now.
    drafter = None if cfg.drafter == "none" else make_drafter(cfg.drafter, resources)
    ensure_profiles(model, draft)
    if cfg.chat:
        from specdec.bench import encode_chat

        ids = encode_chat(tokenizer, [{"role": "user", "content": cfg.prompt}])
    else:
        ids = tokenizer(cfg.prompt, return_tensors="pt").input_ids
    ids = ids.to(model.device)  # model.generate (--compare) wants them there; specdec answers there
    if cfg.compare:  # both sides timed warm: one-time costs (packing the weights) are not the method's
        from specdec.demo.compare import warm_up

        warm_up(model)
    stats = GenerationStats()
    streamer = _line_streamer(tokenizer)
    sampling = temperature_kwargs(cfg.temperature)
    if cfg.seed is not None and cfg.temperature > 0:
        sampling["seed"] = cfg.seed
    try:
        out = generate(
            model, ids, drafter, max_new_tokens=cfg.max_new_tokens, streamer=streamer, stats=stats, **sampling
        )
    except KeyboardInterrupt:
        if streamer.open_line:  # end the streamed line: main's "interrupted" starts a line of its own
            print(flush=True)
        raise
    speed = stats.new_tokens / stats.total_s
    parts = [
        f"{stats.new_tokens} tokens in {stats.total_s:.2f} s: {speed:.2f} tokens/s",
        f"{stats.mean_accepted:.2f} tokens per target forward",
        f"draft {stats.draft_s:.2f} s, verify {stats.verify_s:.2f} s, overhead {stats.overhead_s:.2f} s",
    ]
    if cfg.compare:
        t0 = time.perf_counter()
        ref = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=cfg.max_new_tokens,
            **temperature_kwargs(cfg.temperature),
        )
        base = (ref.shape[1] - ids.shape[1]) / (time.perf_counter() - t0)
        same = (
            ("identical" if torch.equal(ref, out) else "DIFFERENT") if cfg.temperature == 0 else "an independent sample"
        )
        parts.append(f"model.generate {base:.2f} tokens/s, speedup {speed / base:.2f}x, output {same}")
    print("\n[specdec] " + "; ".join(parts), file=sys.stderr)
    return 0


def ensure_profile(model, **kwargs):
    """The stored verify cost curve for this model and machine, measured now if missing."""
    from specdec import profile
    from specdec.models import cache_dir

    prof = profile.stored(model, cache_dir())
    if prof is None:
        key = profile.model_key(model)
        print(f"specdec: measuring the verify cost curve of {key} (one-time for this machine)...", file=sys.stderr)
        prof = profile.profile(model, key, progress=True, **kwargs)
        profile.save(prof, profile.profile_path(cache_dir(), key))
    return prof


def ensure_profiles(target, draft=None) -> None:
    """Curves for the target and the draft model (whose own forwards follow its curve too)."""
    for model in (target, draft):
        if model is not None:
            ensure_profile(model)


def cmd_profile(cfg: ProfileConfig) -> int:
    from specdec import profile
    from specdec.models import cache_dir, load_model

    try:
        ks = tuple(sorted({int(k) for k in cfg.ks.split(",")}))
    except ValueError:
        raise ValueError(f"--ks: expected a comma list of integers, got {cfg.ks!r}") from None
    placement = _placement(cfg)
    _setup(cfg.threads)
    model, _ = load_model(cfg.model, **placement)
    key = profile.model_key(model)
    prof = profile.profile(model, key, ks=ks, context=cfg.context, repeats=cfg.repeats, progress=True)
    path = profile.profile_path(cache_dir(), key)
    profile.save(prof, path)
    curves = [prof.stock] + ([prof.packed] if prof.packed is not None else [])
    print(profile.table(curves))
    print(f"\nmachine: {prof.stock.machine}; context {cfg.context} tokens; median of {cfg.repeats}. "
          "stock = the model's own forward; packed = oneDNN-prepacked linears (specdec.packing).")
    print(f"specdec uses packed linears for forwards over k >= {prof.packed_from} tokens"
          if prof.packed_from is not None else "specdec keeps the stock forward for every k on this machine")
    print(f"written: {path}", file=sys.stderr)
    return 0


def cmd_bench(cfg: BenchConfig) -> int:
    from specdec import profile
    from specdec.bench import (
        check_methods,
        check_same_device,
        describe_device,
        earlier_results,
        finished_records,
        make_drafters,
        parse_packed_from,
        quantize_draft,
        read_questions,
        run_bench,
        write_results,
    )
    from specdec.extras import require
    from specdec.models import cache_dir, load_model

    placement = _placement(cfg)
    methods = check_methods(cfg)  # fail on bad arguments before loading models
    require("matplotlib", "bench")  # the plots, written after every question
    questions = read_questions(cfg.questions, cfg.limit, cfg.categories, cfg.per_category, cfg.first_turns)
    earlier = earlier_results(cfg)  # an existing results.json: refused, or (--resume) continued
    kept = finished_records(earlier["records"], questions, methods) if earlier else []
    resumed = len({r.question_id for r in kept})
    _setup(cfg.threads)
    target, tokenizer = load_model(cfg.model, **placement)
    draft = load_model(cfg.draft_model, **placement)[0] if cfg.draft_model else None
    quantized = quantize_draft(cfg, draft, tokenizer)  # one int8 copy for draft-model[quantized] and hf-assisted
    drafters = make_drafters(cfg, target, draft, quantized)  # a missing resource fails before the one-time profiling
    ensure_profiles(target, draft)
    packed_from = profile.packing(parse_packed_from(cfg.packed_from), cache_dir()).packed_from(target)
    device = describe_device(target) + (
        f"; specdec runs forwards over k >= {packed_from} tokens with packed linears"
        if packed_from is not None else "; specdec verifies with the stock forward"
    )
    if earlier:
        check_same_device(earlier, device, cfg)
    written: list = list(kept)  # the records on disk: rewritten after every question, so Ctrl-C keeps a valid report

    def on_question(records):
        write_results(records, cfg, cfg.out, device, plots=False, resumed=resumed)
        written[:] = records

    if resumed:
        print(f"resuming {cfg.out}/results.json: {resumed} finished question(s) kept", file=sys.stderr)
    try:
        records = run_bench(cfg, target, tokenizer, draft, drafters=drafters, on_question=on_question, earlier=kept,
                            questions=questions, quantized=quantized)
    except KeyboardInterrupt:
        n = len({r.question_id for r in written})
        raise KeyboardInterrupt(f"{cfg.out}/results.json and report.md keep the {n} finished question(s)" if n
                                else f"no question finished, nothing written to {cfg.out}") from None
    print(write_results(records, cfg, cfg.out, device, resumed=resumed))
    print(f"written: {cfg.out}/report.md, {cfg.out}/results.json", file=sys.stderr)
    return 1 if any(not r.exact for r in records) else 0


def _check_port(host: str, port: int) -> None:
    """Refuse a port outside 1..65535 or one already served on, before the models load and the
    URL is printed (gradio would say so only after both). Probed like gradio's own check, with
    SO_REUSEADDR, so a port left in TIME_WAIT by a previous run counts as free."""
    import errno
    import socket

    if not 1 <= port <= 65535:
        raise ValueError(f"--port must be in 1..65535, got {port}")
    address = host.removeprefix("[").removesuffix("]")  # [::1] as a browser writes it
    with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((address, port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise OSError(f"--port {port}: {host}:{port} is in use; pick a free one with --port N") from None
            raise OSError(f"--host {host} --port {port}: cannot serve there: {err.strerror or err}") from None


def cmd_demo(cfg: DemoConfig) -> int:
    from specdec.extras import require

    placement = _placement(cfg)  # before gradio loads
    require("gradio", "demo")
    from specdec.demo import build_demo
    from specdec.models import load_model

    _setup(cfg.threads)
    _check_port(cfg.host, cfg.port)

    def load(name: str):
        model, tokenizer = load_model(name, **placement)  # converts a GGUF the first time
        ensure_profile(model)
        return model, tokenizer

    # preload: the first visitor should not wait for loading or warm-up
    demo = build_demo(load_model=load, default_model=cfg.model, preload=True)
    print(f"specdec demo: http://{cfg.host}:{cfg.port}", file=sys.stderr)
    demo.launch(server_name=cfg.host, server_port=cfg.port)
    return 0


def _vocab_size(model: str, tokenizer) -> int:
    """The target's vocabulary (embedding rows) from its config alone, without loading weights."""
    from pathlib import Path

    from transformers import AutoConfig

    path = Path(model).expanduser()
    try:
        if path.suffix == ".gguf" and path.is_file():
            config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        else:
            config = AutoConfig.from_pretrained(tokenizer.name_or_path)
    except (OSError, ValueError) as err:
        raise OSError(f"--model {model}: could not read the model's config for its vocabulary size: {err}") from err
    return int(config.get_text_config().vocab_size)


def cmd_datastore(cfg: DatastoreConfig) -> int:
    from tqdm.auto import tqdm

    from specdec.drafters.retrieval import Datastore, encode_corpus, read_corpus
    from specdec.models import load_tokenizer
    from specdec.registry import datastore_dir

    if cfg.action != "build":
        raise ValueError(f"datastore: unknown action {cfg.action!r}; the action is: build")
    if not cfg.corpus:
        raise ValueError("datastore build needs --corpus FILE")
    out = cfg.out or str(datastore_dir(cfg.model))
    fields = tuple(f for f in cfg.field.split(",") if f)
    if not fields:
        raise ValueError("--field: give at least one field name")
    records = read_corpus(cfg.corpus, fields, cfg.limit)
    Datastore.check_writable(out)  # before loading the tokenizer, which may convert a model first
    tokenizer = load_tokenizer(cfg.model)
    vocab = _vocab_size(cfg.model, tokenizer)
    described = f"{cfg.corpus}" + (f" fields {','.join(fields)}" if cfg.corpus.endswith(".jsonl") else "")
    described += (f", first {cfg.limit} records" if cfg.limit else "") + (", chat template" if cfg.chat else "")
    docs = encode_corpus(tokenizer, tqdm(records, desc="records", unit=" rec"), chat=cfg.chat)
    store = Datastore.build(docs, out, vocab_size=vocab, model_name=cfg.model, description=described)
    print(f"datastore: {store.meta['documents']} documents, {store.meta['num_tokens']} tokens, vocabulary {vocab}")
    print(f"written: {out}", file=sys.stderr)
    return 0


def cmd_export(cfg: ExportConfig) -> int:
    from pathlib import Path

    from specdec.devices import parse_dtype
    from specdec.drafters import load
    from specdec.models import load_model

    writer = EXPORTERS.get((cfg.kind, cfg.format))
    if writer is None:
        valid = ", ".join(f"--kind {k} --format {f}" for k, f in EXPORTERS)
        raise ValueError(f"export: --kind {cfg.kind} --format {cfg.format} is not an export; choose one of: {valid}")
    if not cfg.output_dir:
        raise ValueError("export needs --output-dir DIR (the directory to write)")
    out = Path(cfg.output_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output-dir {cfg.output_dir}: exists and is not a directory; pick another path")
    if out.is_dir() and any(out.iterdir()) and not cfg.overwrite:
        raise ValueError(f"--output-dir {cfg.output_dir}: exists and is not empty; pass --overwrite to replace it, "
                         "or pick another directory")
    if cfg.drafter_dir is not None and not Path(cfg.drafter_dir).expanduser().is_dir():
        raise ValueError(f"--drafter-dir {cfg.drafter_dir}: no such directory (a checkpoint written by specdec "
                         "train or save_pretrained)")
    dtype = parse_dtype(cfg.dtype)
    _setup(None)
    model, _ = load_model(cfg.model, dtype=dtype)
    drafter = load(cfg.kind, model, None if cfg.drafter_dir is None else Path(cfg.drafter_dir).expanduser())
    writer(drafter, out, verifier=cfg.verifier)
    print(f"exported the {cfg.kind} drafter for {cfg.model} in the {cfg.format} layout")
    print(f"written: {out}", file=sys.stderr)
    return 0


COMMANDS = {
    "generate": (GenerateConfig, cmd_generate, "generate text with speculative decoding (streamed)"),
    "bench": (BenchConfig, cmd_bench, "benchmark methods on Spec-Bench questions, interleaved, exactness checked"),
    "profile": (ProfileConfig, cmd_profile, "measure and store the target's verify cost curve (k = 1..64 new tokens)"),
    "demo": (DemoConfig, cmd_demo, "serve the side-by-side demo page (plain model.generate vs specdec)"),
    "datastore": (DatastoreConfig, cmd_datastore, "build a retrieval (REST) datastore from a corpus: datastore build "
                                                  "--corpus F --out D"),
    "export": (ExportConfig, cmd_export, "write a trained drafter in another framework's layout: export --kind medusa "
                                         "--format vllm --output-dir D"),
}


def build_parser() -> argparse.ArgumentParser:
    """The `specdec` parser: one subcommand per `COMMANDS` entry (``train`` parses its own)."""
    parser = argparse.ArgumentParser(prog="specdec", description="Exact speculative decoding for HF causal LMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (cls, _, help_text) in COMMANDS.items():
        add_dataclass_arguments(sub.add_parser(name, help=help_text, description=help_text), cls)
    sub.add_parser("train", help="train drafters and make their data (`specdec train --help` lists the commands)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:  # its sub-commands parse their own dataclasses with HfArgumentParser
        from specdec.training.cli import main as train_main

        return train_main(argv[1:])
    args = vars(build_parser().parse_args(argv))
    cls, run, _ = COMMANDS[args.pop("command")]
    try:
        return run(cls(**args))
    except KeyboardInterrupt as err:  # Ctrl-C: one line (what was kept, if anything), status 130 as shells use
        print("specdec: interrupted" + (f"; {err}" if str(err) else ""), file=sys.stderr)
        return 130
    except (ValueError, RuntimeError, OSError, ImportError) as err:  # bad inputs: one readable line
        print(f"specdec: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
