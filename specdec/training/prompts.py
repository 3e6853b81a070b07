"""``specdec train make-prompts``: training prompts written by the target itself (Magpie).

An instruction-tuned model given its chat template up to where a user's message begins writes a
user message itself (Magpie, Xu et al. 2024); sampled at temperature 1 (seeded per batch), such
prompts are as varied as its tuning data and need no download (why: docs/design.md). A sample
that does not end its turn within ``max_new_tokens``, is shorter than ``min_chars`` or repeats
an earlier prompt is dropped. The jsonl file (``{"prompt": ...}`` per line, what make-data
reads) is written atomically at the end.

Boundary: data only, like `specdec.training.data`; runs in one process.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from specdec.models import load_model
from specdec.training import arguments
from specdec.training.data import eos_ids, write_text_atomic

_MARKER = "SPECDEC_USER_MESSAGE"


@dataclass
class MakePromptsArguments:
    model: str = field(default="smollm2-135m", metadata={"help": "instruction-tuned model: embedded name, HF path/id "
                                                                 "or .gguf file"})
    output: str = field(default="runs/prompts-magpie.jsonl", metadata={"help": "jsonl file to write ({\"prompt\": ...} "
                                                                               "per line)"})
    num_prompts: int = field(default=1000, metadata={"help": "prompts to keep"})
    max_new_tokens: int = field(default=128, metadata={"help": "longest prompt in tokens; longer samples are dropped"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (1: the model's own distribution)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling (1: off)"})
    min_chars: int = field(default=16, metadata={"help": "drop prompts shorter than this many characters"})
    batch_size: int = field(default=32, metadata={"help": "prompts sampled together"})
    max_batches: int | None = field(default=None, metadata={
        "help": "stop after this many batches even if fewer prompts were kept (default: 4x the batches needed)"})
    seed: int = field(default=0, metadata={"help": "batch i samples with seed + i"})
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads (unset: torch's choice)"})


def user_prefix(tok) -> str:
    """The chat template's text before a user's message (system prompt and user header included)."""
    if not getattr(tok, "chat_template", None):
        raise ValueError("make-prompts: the model's tokenizer has no chat template; use an instruction-tuned model")
    text = tok.apply_chat_template([{"role": "user", "content": _MARKER}], tokenize=False)
    if _MARKER not in text:
        raise ValueError("make-prompts: the model's chat template does not render the user's message")
    return text[: text.index(_MARKER)]


def make_prompts(args: MakePromptsArguments) -> Path:
    """Sample prompts from `args.model` (Magpie) into `args.output`; returns its path."""
    if (
        min(args.num_prompts, args.max_new_tokens, args.batch_size) < 1
        or args.temperature <= 0
        or not 0 < args.top_p <= 1
    ):
        raise ValueError("make-prompts: --num-prompts, --max-new-tokens and --batch-size must be >= 1, "
                         "--temperature > 0 and 0 < --top-p <= 1")
    arguments.at_least_one(max_batches=args.max_batches, threads=args.threads)
    path = arguments.output_file(args.output)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    prefix = tok(user_prefix(tok), add_special_tokens=False, return_tensors="pt").input_ids.to(model.device)  # [1, s]
    eos = eos_ids(model) | ({tok.eos_token_id} if tok.eos_token_id is not None else set())
    max_batches = args.max_batches or 4 * math.ceil(args.num_prompts / args.batch_size)
    kept: list[str] = []
    seen: set[str] = set()
    sampled, start = 0, time.perf_counter()
    progress = tqdm(total=args.num_prompts, desc="make-prompts", unit="prompt")
    for batch in range(max_batches):
        if len(kept) >= args.num_prompts:
            break
        torch.manual_seed(args.seed + batch)
        ids = prefix.expand(args.batch_size, -1)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                             temperature=args.temperature, top_p=args.top_p, top_k=0,
                             max_new_tokens=args.max_new_tokens, eos_token_id=sorted(eos),
                             pad_token_id=tok.pad_token_id).cpu()[:, prefix.shape[1]:]  # [b, <= max_new_tokens]
        for row in out.tolist():
            sampled += 1
            end = next((i for i, t in enumerate(row) if t in eos), None)
            if end is None:  # cut off mid-message
                continue
            text = tok.decode(row[:end], skip_special_tokens=True).strip()
            key = " ".join(text.lower().split())
            if len(text) >= args.min_chars and key not in seen and len(kept) < args.num_prompts:
                seen.add(key)
                kept.append(text)
                progress.update(1)
    progress.close()
    if not kept:
        raise ValueError(f"make-prompts: none of {sampled} samples ended its user turn within --max-new-tokens "
                         f"{args.max_new_tokens} with at least --min-chars {args.min_chars} characters")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, "".join(json.dumps({"prompt": p}) + "\n" for p in kept))
    print(f"make-prompts: kept {len(kept)} of {sampled} samples in {time.perf_counter() - start:.0f} s")
    return path
