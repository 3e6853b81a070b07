"""The training loop shared by every drafter recipe, under `accelerate`.

One command runs on one CPU or many GPUs (``accelerate launch -m specdec.training ...``; CPU
processes with ``--multi_gpu --num_processes N`` train together over gloo). The trainable module,
optimizer and schedule go through ``Accelerator.prepare``; the frozen target is only moved. The
data order is a pure function of (seed, epoch, step), so a resumed run sees the same batches.
Output: ``log.jsonl``, atomic ``checkpoints/step-N/`` (with file sizes, so ``--resume`` skips a
damaged one and says so) and ``drafter/`` whose config records how it was made and how well it
predicts. A `Recipe` supplies the module, its loss, its evaluation and how to save it.

Boundary: imports the core (model loading), the data module and nothing drafter-specific.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from specdec.models import load_model
from specdec.training import arguments
from specdec.training.data import Batch, collate, load_examples, manifest_of, split, stored_layers, target_states

LOG = "log.jsonl"
CHECKPOINTS = "checkpoints"
DRAFTER_DIR = "drafter"
STATE = "trainer_state.json"


@dataclass
class TrainArguments:
    model: str = field(default="smollm2-135m", metadata={"help": "target: embedded name, HF directory/hub id or .gguf "
                                                                 "file"})
    data: str = field(default="runs/data", metadata={"help": "output dir of `specdec train make-data` (or its "
                                                             "dataset/); several joined by commas are concatenated"})
    output_dir: str = field(default="runs/drafter", metadata={"help": "log.jsonl, checkpoints/ and the trained "
                                                                      "drafter/"})
    max_steps: int = field(default=1000, metadata={"help": "optimizer steps (the data is cycled in epochs)"})
    batch_size: int = field(default=4, metadata={"help": "sequences per process per step"})
    learning_rate: float = field(default=1e-3, metadata={"help": "peak AdamW learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    lr_scheduler: str = field(default="cosine", metadata={"help": "transformers schedule: cosine, linear, constant, "
                                                                  "..."})
    warmup_steps: int = field(default=0, metadata={"help": "linear warm-up steps"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping (0: off)"})
    max_length: int = field(default=1024, metadata={"help": "sequences are cut to this many tokens"})
    eval_fraction: float = field(default=0.05, metadata={"help": "share of examples held out for the final evaluation"})
    save_steps: int = field(default=200, metadata={"help": "checkpoint every N steps (and at the end)"})
    save_total_limit: int = field(default=2, metadata={"help": "keep this many newest checkpoints"})
    log_steps: int = field(default=10, metadata={"help": "log the loss every N steps"})
    resume: bool = field(default=False, metadata={"help": "continue from the newest checkpoint in output_dir"})
    seed: int = field(default=0, metadata={"help": "seeds initialisation, data split and data order"})
    dtype: str = field(default="float32", metadata={"help": "target dtype: float32, bfloat16 or float16"})
    mixed_precision: str = field(default="no", metadata={
        "help": "no, bf16 or fp16: run the loss under accelerate's autocast (weights and optimizer stay fp32); bf16 "
                "is 2-3x faster on CPUs with AVX512-BF16 or AMX, where the lm_head matmuls dominate"})
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads per process"})


class Recipe(Protocol):
    kind: str  # the drafter name, e.g. "medusa"
    needs_hidden_states: bool  # fill Batch.hidden_states (stored, or from a target forward)

    def build(self, target, train: TrainArguments) -> nn.Module:
        """The trainable module, freshly initialised (`train` names the data and its split, for a
        recipe that reads the training split first)."""

    def loss(self, module: nn.Module, target, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        """The scalar to minimise and named parts to log."""

    def evaluate(self, module: nn.Module, target, batches: Iterator[Batch]) -> dict:
        """Held-out metrics; written into the drafter's metadata."""

    def save(self, module: nn.Module, target, directory: Path, metadata: dict) -> Path:
        """Write the drafter checkpoint (via its `save_pretrained`)."""

    def arguments(self) -> dict:
        """The recipe's own arguments, recorded in the metadata."""


def _layers(recipe: Recipe) -> tuple[int, ...]:
    """The target states a recipe's module reads (HF hidden-state indices; default the last layer)."""
    return tuple(getattr(recipe, "hidden_layers", None) or (-1,))


def _batch(ds, indices: Tensor, args: TrainArguments, recipe: Recipe, target, device) -> Batch:
    batch = collate(ds[indices.tolist()], args.max_length).to(device)
    if recipe.needs_hidden_states and batch.hidden_states is None:
        batch.hidden_states = target_states(target, batch, _layers(recipe))
    return batch


def _log(out: Path, record: dict) -> None:
    with open(out / LOG, "a") as f:
        f.write(json.dumps(record) + "\n")


def _checkpoints(out: Path) -> list[Path]:
    return sorted((out / CHECKPOINTS).glob("step-*"))


def _save_checkpoint(accelerator, out: Path, step: int, seconds: float, keep: int) -> None:
    """accelerate state into a temporary dir every process writes to, renamed when complete."""
    root = out / CHECKPOINTS
    staged, final = root / f".tmp-step-{step:08d}", root / f"step-{step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(staged, ignore_errors=True)
        staged.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staged))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        files = {str(f.relative_to(staged)): f.stat().st_size for f in sorted(staged.rglob("*")) if f.is_file()}
        (staged / STATE).write_text(json.dumps({"step": step, "seconds": seconds, "files": files}) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        staged.rename(final)
        for old in _checkpoints(out)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _damage(checkpoint: Path) -> str | None:
    """What is wrong with a checkpoint's files (missing, or not the size `STATE` recorded), or None.
    A checkpoint saved before sizes were recorded is taken as it is."""
    try:
        state = json.loads((checkpoint / STATE).read_text())
        files = state.get("files", {})
        int(state["step"]), float(state["seconds"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"{STATE} is missing or unreadable"
    for name, size in files.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} of its {size} bytes"
    return None


def _resume(accelerator, out: Path) -> tuple[int, float]:
    found = _checkpoints(out)
    if not found:
        accelerator.print(f"--resume: no checkpoint in {out / CHECKPOINTS}, starting from step 0")
        if accelerator.is_main_process and (out / LOG).is_file():
            (out / LOG).unlink()  # its steps will be trained (and logged) again
        return 0, 0.0
    damaged = []
    while found and (problem := _damage(found[-1])):
        damaged.append(f"{found.pop().name} ({problem})")
    if not found:
        raise ValueError(f"--resume: no complete checkpoint in {out / CHECKPOINTS}: {'; '.join(damaged)}; "
                         "start again in another --output-dir")
    if damaged and accelerator.is_main_process:
        print(f"--resume: skipping damaged checkpoint {'; '.join(damaged)}; resuming from {found[-1].name}",
              file=sys.stderr)
    accelerator.load_state(str(found[-1]))
    state = json.loads((found[-1] / STATE).read_text())
    if accelerator.is_main_process and (out / LOG).is_file():
        # Steps logged after the checkpoint will be trained (and logged) again; a final
        # evaluation of the earlier run no longer describes the drafter.
        records = [json.loads(line) for line in (out / LOG).read_text().splitlines()]
        kept = [r for r in records if r["step"] <= state["step"] and "eval" not in r]
        (out / LOG).write_text("".join(json.dumps(r) + "\n" for r in kept))
    accelerator.print(f"resuming from {found[-1]} (step {state['step']})")
    return state["step"], state["seconds"]


def _checked(args: TrainArguments) -> tuple[torch.dtype, Path]:
    """Every argument check, before the model loads and before anything is written: the target
    dtype and the output directory (refused if it holds a run and --resume is not given)."""
    from transformers import SchedulerType

    arguments.at_least_one(**{name: getattr(args, name) for name in (
        "max_steps", "batch_size", "save_steps", "log_steps", "max_length", "threads")})
    dtype = arguments.dtype(args.dtype)
    if args.mixed_precision not in ("no", "bf16", "fp16"):
        raise ValueError(f"--mixed-precision must be no, bf16 or fp16, got {args.mixed_precision!r}")
    if args.lr_scheduler not in {s.value for s in SchedulerType}:
        raise ValueError(f"--lr-scheduler must be one of {', '.join(s.value for s in SchedulerType)}, "
                         f"got {args.lr_scheduler!r}")
    out = arguments.output_dir(args.output_dir)
    left = [name for name in (CHECKPOINTS, LOG, DRAFTER_DIR) if (out / name).exists()]
    if left and not args.resume:  # a killed (or finished) run: starting over would mix two runs' files
        raise ValueError(f"--output-dir {str(out)!r} already holds a training run ({', '.join(left)}): pass --resume "
                         "to continue it, or choose another --output-dir")
    return dtype, out


def _accelerator(args: TrainArguments):
    """accelerate, configured afresh for this run (a second train() in one process, e.g. another
    --mixed-precision, must not inherit the first's state; the distributed setup, PartialState,
    stays). Without a GPU, processes started by `accelerate launch --multi_gpu` must be told to
    use CPU DDP (gloo); otherwise each would silently train alone and overwrite the others' files."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed

    AcceleratorState._reset_state()
    accelerator = Accelerator(cpu=not torch.accelerator.is_available(), mixed_precision=args.mixed_precision)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise RuntimeError(f"launched as {launched} processes but accelerate joined {accelerator.num_processes}; "
                           "start several processes with `accelerate launch --multi_gpu --num_processes N ...`")
    set_seed(args.seed)
    return accelerator


def _step(accelerator, module, optimizer, scheduler, recipe: Recipe, target, batch: Batch, max_grad_norm: float):
    """One optimizer step; returns the loss, its named parts and the learning rate the step used."""
    with accelerator.autocast():  # also covers what a recipe computes outside the module (frozen lm_head)
        loss, parts = recipe.loss(module, target, batch)
    accelerator.backward(loss)
    if max_grad_norm > 0:
        accelerator.clip_grad_norm_(module.parameters(), max_grad_norm)
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()
    return loss, parts, lr


def _save_drafter(accelerator, module, recipe: Recipe, target, args: TrainArguments, ds, split_idx, step: int,
                  seconds: float, command: str | None, directory: Path) -> None:
    """The held-out evaluation, logged and written with how the drafter was made into its metadata."""
    train_idx, eval_idx = split_idx
    module = accelerator.unwrap_model(module).eval()
    with torch.no_grad():
        batches = (_batch(ds, eval_idx[s : s + args.batch_size], args, recipe, target, accelerator.device)
                   for s in range(0, len(eval_idx), args.batch_size))
        metrics = recipe.evaluate(module, target, batches)
    _log(directory.parent, {"step": step, **metrics})
    data = manifest_of(args.data)
    keys = ("settings", "examples", "answer_tokens", "seconds")
    metadata = {
        **metrics,
        "training": {
            "command": command,
            "steps": step,
            "seconds": round(seconds, 3),
            "processes": accelerator.num_processes,
            "device": str(accelerator.device),
            "train_examples": len(train_idx),
            "train_answer_tokens": _answer_tokens(ds, train_idx),
            "eval_examples": len(eval_idx),
            "data": ({"parts": [{k: part.get(k) for k in keys} for part in data["parts"]]} if "parts" in data
                     else {k: data.get(k) for k in keys}),
            "arguments": {**asdict(args), **recipe.arguments()},
        },
    }
    recipe.save(module, target, directory, metadata)


def train(args: TrainArguments, recipe: Recipe, command: str | None = None) -> Path:
    """Train `recipe`'s drafter on `args.data`; returns the saved drafter's directory."""
    from transformers import get_scheduler

    dtype, out = _checked(args)
    ds = load_examples(args.data)
    train_idx, eval_idx = split(len(ds), args.eval_fraction, args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    accelerator = _accelerator(args)
    world, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    steps_per_epoch = len(train_idx) // (args.batch_size * world)
    if steps_per_epoch == 0:
        raise ValueError(f"{len(train_idx)} training examples cannot fill one step of {world} x --batch-size "
                         f"{args.batch_size}; lower --batch-size or make more data")
    target, _ = load_model(args.model, dtype=dtype, device=accelerator.device)
    if main:
        out.mkdir(parents=True, exist_ok=True)

    module = recipe.build(target, args)
    wanted = _layers(recipe)
    stored = stored_layers(args.data) if recipe.needs_hidden_states else None
    if stored is not None and stored != wanted:
        raise ValueError(f"--data {args.data} stores the target states of layers {list(stored)} but the {recipe.kind} "
                         f"head reads layers {list(wanted)}; remake the data with --hidden-layers "
                         f"{','.join(map(str, wanted))} (or without --save-hidden-states)")
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=args.learning_rate,
                                  weight_decay=args.weight_decay)
    scheduler = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=args.warmup_steps,
                              num_training_steps=args.max_steps)
    module, optimizer, scheduler = accelerator.prepare(module, optimizer, scheduler)
    step, seconds = _resume(accelerator, out) if args.resume else (0, 0.0)

    progress = tqdm(total=args.max_steps, initial=step, desc=f"train {recipe.kind}", disable=not main)
    t0 = time.perf_counter() - seconds
    module.train()
    while step < args.max_steps:
        epoch, i = divmod(step, steps_per_epoch)  # data order: a pure function of (seed, epoch) and the step
        order = train_idx[torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(args.seed + epoch))]
        first = (i * world + rank) * args.batch_size
        batch = _batch(ds, order[first : first + args.batch_size], args, recipe, target, accelerator.device)
        loss, parts, lr = _step(accelerator, module, optimizer, scheduler, recipe, target, batch, args.max_grad_norm)
        step += 1
        progress.update(1)
        if step % args.log_steps == 0 or step == args.max_steps:
            mean = float(accelerator.reduce(loss.detach(), reduction="mean"))
            progress.set_postfix(loss=f"{mean:.4f}")
            if main:
                _log(out, {"step": step, "epoch": epoch, "loss": mean, **parts, "lr": lr,
                           "seconds": round(time.perf_counter() - t0, 3)})
        if step % args.save_steps == 0 or step == args.max_steps:
            _save_checkpoint(accelerator, out, step, time.perf_counter() - t0, args.save_total_limit)
    seconds = time.perf_counter() - t0
    progress.close()
    if main:
        _save_drafter(accelerator, module, recipe, target, args, ds, (train_idx, eval_idx), step, seconds, command,
                      out / DRAFTER_DIR)
    accelerator.wait_for_everyone()
    return out / DRAFTER_DIR


def _answer_tokens(ds, indices: Tensor) -> int:
    rows = ds.select(indices.tolist())
    return int(sum(len(x) for x in rows["input_ids"]) - sum(int(p) for p in rows["prompt_length"]))
