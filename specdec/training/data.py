"""Training data for drafters: self-distillation (`make-data`) and batches of it.

`make_data` has the target answer jsonl prompts through its chat template (greedy; `batch_size`
answers decoded together, a finished one making room for the next prompt) and stores prompt +
answer token ids with the prompt length, optionally with the target's hidden states (fp16; the
last post-norm layer, or `--hidden-layers`), so head training never runs the target again.
Answers are what greedy `generate` gives each prompt alone, up to batched rounding. With
`--answers` it rescores another model's answers instead: one forward per sequence stores the
target's own next token at every position (`target_ids`).
Work is saved in shards with a manifest (a rerun resumes), then assembled under
``<output_dir>/dataset``. `Batch` / `collate` make right-padded tensors with the answer-token
mask; `target_states` computes the hidden states when they were not stored.

Boundary: data only; no drafter and no training loop. Runs in one process.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from specdec import kv
from specdec.extras import require
from specdec.models import load_model
from specdec.training import arguments
from specdec.verifier import side_by_side

DATASET_DIR = "dataset"
MANIFEST = "manifest.json"


@dataclass
class MakeDataArguments:
    # dataclasses.field in full: the `field` argument below shadows the bare name in this body.
    model: str = dataclasses.field(default="smollm2-135m", metadata={"help": "target: embedded name, HF directory/hub "
                                                                             "id or .gguf file"})
    prompts: str = dataclasses.field(default="../shared/data/train_prompts.jsonl", metadata={"help": "jsonl file of "
                                                                                                     "prompts"})
    field: str = dataclasses.field(default="prompt", metadata={"help": "the jsonl key holding each prompt"})
    output_dir: str = dataclasses.field(default="runs/data", metadata={"help": "where shards, manifest.json and "
                                                                               "dataset/ go"})
    max_new_tokens: int = dataclasses.field(default=256, metadata={"help": "longest answer, in tokens"})
    limit: int | None = dataclasses.field(default=None, metadata={"help": "use only the first N prompts (default: "
                                                                          "all)"})
    batch_size: int = dataclasses.field(default=64, metadata={"help": "answers decoded together (a finished one "
                                                                        "makes room for the next prompt); also "
                                                                        "the batch of the hidden-state forwards"})
    shard_size: int = dataclasses.field(default=64, metadata={"help": "prompts per saved shard: the unit of resuming"})
    save_hidden_states: bool = dataclasses.field(default=False, metadata={
        "help": "also store the target's hidden states (fp16) so head training skips the target forward"})
    hidden_layers: str = dataclasses.field(default="last", metadata={
        "help": "the states --save-hidden-states stores: last (post-norm; eagle, medusa), eagle3 (EAGLE-3's layers "
                "2, N/2, N-3 side by side) or comma-separated HF hidden-state indices"})
    answers: str | None = dataclasses.field(default=None, metadata={
        "help": "rescore instead of generating: take prompts and answers from this make-data output (made by a "
                "model with the same tokenizer, e.g. a smaller one); one teacher-forced forward per sequence stores "
                "the target's own next token at every position (and its states), at prefill speed"})
    dtype: str = dataclasses.field(default="float32", metadata={"help": "target dtype: float32, bfloat16 or float16"})
    threads: int | None = dataclasses.field(default=None, metadata={"help": "torch CPU threads (unset: torch's "
                                                                            "choice)"})


def read_prompts(path: str | Path, key: str, limit: int | None = None) -> list[str]:
    """The `key` field of each line of the jsonl file `path` (the first `limit`); a bad line is
    refused with its file and line number."""
    if not Path(path).is_file():
        raise ValueError(f"--prompts {str(path)!r}: no such file; give a jsonl file with a {key!r} field on each line "
                         "(`specdec train make-prompts` writes one)")
    from specdec.drafters.retrieval import read_jsonl

    prompts = []
    for n, row in read_jsonl(path):  # undecodable or non-JSON lines refused as path:line
        if not isinstance(row, dict) or key not in row:
            fields = f"fields: {sorted(row)}" if isinstance(row, dict) else f"a JSON {type(row).__name__}"
            raise ValueError(f"{path}:{n} has no field {key!r} ({fields}); pass --field NAME")
        prompts.append(str(row[key]))
        if limit is not None and len(prompts) >= limit:
            break
    if not prompts:
        raise ValueError(f"no prompts in {path}")
    return prompts


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temp file and a rename: a crash leaves the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_json(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def _save_dataset(ds, directory: Path) -> None:
    """`save_to_disk` into a temporary sibling, then rename into place."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        ds.save_to_disk(str(staged / "d"))
        if directory.exists():
            shutil.rmtree(directory)
        os.rename(staged / "d", directory)
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def parse_layers(spec: str, num_layers: int) -> tuple[int, ...]:
    """--hidden-layers as HF hidden-state indices: "last" -> (-1,), "eagle3" -> EAGLE-3's three."""
    from specdec.drafters.eagle3 import check_aux_layers, default_aux_layers

    if spec == "last":
        return (-1,)
    if spec == "eagle3":
        return default_aux_layers(num_layers)
    try:
        layers = tuple(int(i) for i in spec.split(","))
    except ValueError:
        raise ValueError(f"--hidden-layers takes last, eagle3 or comma-separated ints, got {spec!r}") from None
    return check_aux_layers(layers, num_layers, "--hidden-layers") if len(layers) > 1 else layers


def stored_layers(path) -> tuple[int, ...] | None:
    """The hidden-state indices make-data output `path` stored (every part's, which must agree),
    or None when it stored none."""
    dirs = data_dirs(path)
    found = set()
    for d in dirs:
        settings = manifest_of(d).get("settings", {})
        if not settings.get("save_hidden_states"):
            return None
        found.add(tuple(settings.get("layers", [-1])))
    if len(found) > 1:
        raise ValueError(f"--data {path}: its parts stored different hidden states ({sorted(found)})")
    return found.pop()


def eos_ids(model) -> set[int]:
    eos = model.generation_config.eos_token_id
    return set() if eos is None else {int(e) for e in ([eos] if isinstance(eos, int) else eos)}


@dataclass
class Batch:
    input_ids: Tensor  # [b, t] right-padded with 0
    attention_mask: Tensor  # [b, t] 1 for real tokens
    answer_mask: Tensor  # [b, t] bool: tokens the target generated (the labels)
    hidden_states: Tensor | None = None  # [b, t, F] stored target states, if any
    target_ids: Tensor | None = None  # [b, t] the target's greedy token after each position (rescored text)

    def to(self, device) -> Batch:
        return Batch(*(None if x is None else x.to(device) for x in (self.input_ids, self.attention_mask,
                                                                    self.answer_mask, self.hidden_states,
                                                                    self.target_ids)))


def collate(rows: dict, max_length: int | None = None) -> Batch:
    """Examples as `datasets` returns them in torch format (``ds[indices]``) -> a `Batch`."""
    ids = [torch.as_tensor(x)[:max_length] for x in rows["input_ids"]]
    t = max(len(x) for x in ids)
    input_ids = torch.zeros(len(ids), t, dtype=torch.long)
    attention = torch.zeros(len(ids), t, dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = x
        attention[i, : len(x)] = 1
    prompt = torch.as_tensor(rows["prompt_length"]).view(-1, 1)
    answer = attention.bool() & (torch.arange(t)[None] >= prompt)
    hidden = None
    if "hidden_states" in rows:
        states = [h[:max_length] for h in rows["hidden_states"]]
        hidden = torch.zeros(len(ids), t, states[0].shape[-1], dtype=torch.float32)
        for i, h in enumerate(states):
            hidden[i, : len(h)] = h
    target_ids = None
    if "target_ids" in rows:
        target_ids = torch.zeros_like(input_ids)
        for i, x in enumerate(rows["target_ids"]):
            x = torch.as_tensor(x)[:max_length]
            target_ids[i, : len(x)] = x
    return Batch(input_ids, attention, answer, hidden, target_ids)


@torch.no_grad()
def target_states(model, batch: Batch, layers=(-1,)) -> Tensor:
    """[b, t, F] the target's states as the verifier hands them to a drafter reading HF hidden-state
    indices `layers`: the last layer's (post final norm) by default, else those side by side."""
    layers = tuple(layers)
    out = model.get_decoder()(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                              output_hidden_states=layers != (-1,))
    if layers == (-1,):
        return out.last_hidden_state
    return side_by_side(out.hidden_states, layers)


def data_dirs(path: str | Path) -> list[Path]:
    """The make-data directories named by `path`: one, or several joined by commas."""
    parts = [p.strip() for p in str(path).split(",")]
    if not all(parts):
        raise ValueError(f"data path {str(path)!r} has an empty entry: name make-data dirs joined by single commas")
    return [Path(p) for p in parts]


def load_examples(path: str | Path):
    """The dataset written by `make_data` (give its output_dir or the dataset dir itself; several,
    joined by commas, are concatenated in that order, keeping the columns they share: hidden states
    only if every part has them)."""
    datasets = require("datasets", "train")

    dirs = data_dirs(path)
    if len(dirs) > 1:
        models = {str(d): manifest_of(d).get("settings", {}).get("model") for d in dirs}
        if len(set(models.values()) - {None}) > 1:
            raise ValueError(f"--data joins make-data outputs of different targets ({models}): train on the "
                             "outputs of one target only")
        parts = [load_examples(d) for d in dirs]
        shared = [c for c in parts[0].column_names if all(c in part.column_names for part in parts)]
        if any("hidden_states" in part.column_names for part in parts) and "hidden_states" not in shared:
            warnings.warn(f"{path}: not every part stored hidden states, so none are used: the target computes "
                          "them for every batch (make every part with --save-hidden-states to skip that)")
        return datasets.concatenate_datasets([part.select_columns(shared) for part in parts]).with_format("torch")
    path = dirs[0]
    if (path / MANIFEST).is_file():
        manifest = json.loads((path / MANIFEST).read_text())
        if not manifest.get("done"):
            raise ValueError(f"{path} is unfinished ({len(manifest['shards'])} shards so far): rerun make-data with "
                             "the "
                             "same arguments to finish it")
        path = path / DATASET_DIR
    if not path.is_dir():
        raise ValueError(f"--data {str(path)!r}: no training data there; run `specdec train make-data --output-dir "
                         f"{path}` first")
    return datasets.load_from_disk(str(path)).with_format("torch")


def split(n: int, eval_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """(train, held-out) example indices, fixed by the seed."""
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_eval = int(round(n * eval_fraction))
    if eval_fraction > 0:
        n_eval = min(max(n_eval, 1), n - 1)
    return order[n_eval:], order[:n_eval]


def frequent_answer_tokens(path: str | Path, size: int, vocab_size: int, *, eval_fraction: float = 0.05,
                           seed: int = 0) -> tuple[Tensor, float]:
    """A draft vocabulary (EAGLE-3) from make-data output `path`: ([<= size] the ids of the `size`
    tokens the target generated most often in the answers of the training split, most frequent
    first; the fraction of the held-out split's answer tokens they cover). The split is `split`'s
    with the same `eval_fraction` and `seed` as training. Answers only: a drafter adds each
    request's own tokens as it goes."""
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    rows = load_examples(path).select_columns(["input_ids", "prompt_length"])
    train_idx, eval_idx = split(len(rows), eval_fraction, seed)

    def count(indices: Tensor) -> Tensor:
        counts = torch.zeros(vocab_size, dtype=torch.long)
        for i in indices.tolist():
            row = rows[i]
            answer = row["input_ids"][int(row["prompt_length"]):]
            if answer.numel() and int(answer.max()) >= vocab_size:
                raise ValueError(f"{path} holds token id {int(answer.max())}, outside the target's vocabulary of "
                                 f"{vocab_size}: it was made with another tokenizer")
            counts += torch.bincount(answer, minlength=vocab_size)
        return counts

    counts = count(train_idx)
    if not counts.any():
        raise ValueError(f"{path} holds no answer tokens to count")
    keep = counts.argsort(descending=True, stable=True)[: min(size, int((counts > 0).sum()))]
    held = count(eval_idx) if eval_idx.numel() else counts
    return keep, float(held[keep].sum() / held.sum().clamp(min=1))


def manifest_of(path: str | Path) -> dict:
    """The make-data manifest (settings and sizes) for a data dir, or {} when it has none; for
    several dirs, {"parts": [their manifests]}."""
    dirs = data_dirs(path)
    if len(dirs) > 1:
        return {"parts": [manifest_of(d) for d in dirs]}
    for candidate in (dirs[0] / MANIFEST, dirs[0].parent / MANIFEST):
        if candidate.is_file():
            return json.loads(candidate.read_text())
    return {}


class _Rows:
    """The KV cache `_greedy` decodes with: `rows` sequences side by side, each from column 0, in
    tensors grown to the longest prompt + answer seen (memory: rows x that x the KV of a token);
    `pos` is the column each row writes next. The model calls only `update`: a 4D mask (`mask`)
    skips transformers' mask code, so no other cache method is needed."""

    def __init__(self, rows: int, device: torch.device):
        self.rows, self.keys, self.values, self.width = rows, [], [], 0
        self.pos = torch.zeros(rows, dtype=torch.long, device=device)

    def put(self, row: int, states: list[tuple[Tensor, Tensor]], width: int) -> None:
        """Row `row` now holds a prompt: `states` as `kv.states` gives them for a batch of one; `width`
        columns are made room for (prompt + longest answer)."""
        if not self.keys:
            self.keys = [k.new_zeros(self.rows, k.shape[1], 0, k.shape[3]) for k, _ in states]
            self.values = [v.new_zeros(self.rows, v.shape[1], 0, v.shape[3]) for _, v in states]
        have = self.keys[0].shape[2]
        if width > have:  # by a quarter at least: a few copies in all, not one a row
            grow = max(width, have * 5 // 4) - have
            self.keys = [torch.cat([k, k.new_zeros(*k.shape[:2], grow, k.shape[3])], 2) for k in self.keys]
            self.values = [torch.cat([v, v.new_zeros(*v.shape[:2], grow, v.shape[3])], 2) for v in self.values]
        n = states[0][0].shape[2]
        for (k, v), keys, values in zip(states, self.keys, self.values):
            keys[row, :, :n], values[row, :, :n] = k[0], v[0]
        self.pos[row] = n

    def keep(self, rows: list[int]) -> None:
        index = torch.tensor(rows, device=self.pos.device)
        self.keys = [k[index] for k in self.keys]
        self.values = [v[index] for v in self.values]
        self.pos, self.rows = self.pos[index], len(rows)

    def mask(self, dtype: torch.dtype) -> Tensor:
        """[rows, 1, 1, width] additive: each row sees its columns up to `pos`; sets `width` for `update`."""
        self.width = int(self.pos.max()) + 1
        hidden = torch.arange(self.width, device=self.pos.device)[None] > self.pos[:, None]
        return torch.zeros(hidden.shape, dtype=dtype, device=hidden.device).masked_fill(
            hidden, torch.finfo(dtype).min)[:, None, None]

    def update(self, key: Tensor, value: Tensor, layer: int, *args, **kwargs) -> tuple[Tensor, Tensor]:
        rows = torch.arange(self.rows, device=self.pos.device)
        self.keys[layer][rows, :, self.pos] = key[:, :, 0]
        self.values[layer][rows, :, self.pos] = value[:, :, 0]
        return self.keys[layer][:, :, : self.width], self.values[layer][:, :, : self.width]


@torch.no_grad()
def _greedy(model, prompts: list[list[int]], max_new_tokens: int, rows: int) -> Iterator[tuple[int, list[int]]]:
    """Greedy answers to `prompts` (token ids) as (index, answer) pairs, yielded as each finishes (EOS
    kept). `rows` answers are decoded together and a finished row takes the next prompt, so no row
    waits for a longer one; each prompt is prefilled alone, as unbatched `generate` does."""
    eos, device = eos_ids(model), model.device
    cache = _Rows(min(rows, len(prompts)), device)
    todo = list(enumerate(prompts))[::-1]
    slots: list[tuple[int, list[int]] | None] = [None] * cache.rows  # (prompt index, answer so far) per row
    while True:
        for row in range(len(slots)):
            while slots[row] is None and todo:
                i, ids = todo.pop()
                prefill = kv.new_cache(model)
                logits = model(input_ids=torch.tensor([ids], device=device), use_cache=True, logits_to_keep=1,
                               **kv.cache_kwargs(model, prefill)).logits
                answer = [int(logits[0, -1].argmax())]
                if answer[0] in eos or max_new_tokens == 1:
                    yield i, answer
                else:
                    cache.put(row, kv.states(prefill), len(ids) + max_new_tokens)
                    slots[row] = (i, answer)
        live = [row for row, slot in enumerate(slots) if slot is not None]
        if not live:
            return
        if len(live) <= len(slots) * 3 // 4:  # no prompts left: stop computing most idle rows
            cache.keep(live)
            slots = [slots[row] for row in live]
        last = torch.tensor([[slot[1][-1] if slot else 0] for slot in slots], device=device)
        logits = model(input_ids=last, position_ids=cache.pos[:, None], attention_mask=cache.mask(model.dtype),
                       use_cache=True, **kv.cache_kwargs(model, cache)).logits
        busy = torch.tensor([slot is not None for slot in slots], device=device)
        cache.pos += busy  # idle rows stay where they are
        for row, token in enumerate(logits[:, -1].argmax(-1).tolist()):
            if slots[row] is not None:
                i, answer = slots[row]
                answer.append(token)
                if token in eos or len(answer) == max_new_tokens:
                    yield i, answer
                    slots[row] = None


def _chat_ids(tok, prompt: str) -> list[int]:
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    return list(tok(text, add_special_tokens=False)["input_ids"])


def _shard_rows(model, prompts: list[list[int]], answers: list[list[int]], args: MakeDataArguments,
                layers=(-1,)) -> dict:
    """A shard's columns: {"input_ids": [...], "prompt_length": [...], ("hidden_states": [...])}."""
    rows: dict[str, list] = {"input_ids": [p + a for p, a in zip(prompts, answers)],
                             "prompt_length": [len(p) for p in prompts]}
    if args.save_hidden_states:
        rows["hidden_states"] = []
        for start in range(0, len(rows["input_ids"]), args.batch_size):
            batch = collate({k: v[start : start + args.batch_size] for k, v in rows.items() if k != "hidden_states"})
            states = target_states(model, batch.to(model.device), layers).half().cpu()
            rows["hidden_states"] += [states[i, : int(n)].numpy() for i, n in enumerate(batch.attention_mask.sum(1))]
    return rows


@torch.no_grad()
def _rescore_shard(model, rows: dict, args: MakeDataArguments, layers: tuple[int, ...]) -> dict:
    """`rows` (input_ids, prompt_length) of another model's answers with the target's greedy next
    token at every position (`target_ids`) and, if asked, its states at `layers`: one forward per
    batch of sequences, no generation."""
    out = {"input_ids": [torch.as_tensor(x).tolist() for x in rows["input_ids"]],
           "prompt_length": [int(n) for n in rows["prompt_length"]], "target_ids": []}
    if args.save_hidden_states:
        out["hidden_states"] = []
    head = model.get_output_embeddings()
    for start in range(0, len(out["input_ids"]), args.batch_size):
        batch = collate({k: out[k][start : start + args.batch_size] for k in ("input_ids", "prompt_length")})
        batch = batch.to(model.device)
        dec = model.get_decoder()(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                  output_hidden_states=True)
        last = dec.last_hidden_state  # [b, t, H]
        top = torch.cat([head(last[:, i : i + 64]).argmax(-1) for i in range(0, last.shape[1], 64)], dim=1)
        states = side_by_side(dec.hidden_states, layers).half().cpu() if args.save_hidden_states else None
        for i, n in enumerate(batch.attention_mask.sum(1).tolist()):
            out["target_ids"].append(top[i, :n].tolist())
            if states is not None:
                out["hidden_states"].append(states[i, :n].numpy())
    return out


def _sources(args: MakeDataArguments):
    """What the shards are cut from: the prompts, or (--answers) the rows to rescore."""
    if args.answers is None:
        return read_prompts(args.prompts, args.field, args.limit)
    rows = load_examples(args.answers).select_columns(["input_ids", "prompt_length"])
    if args.limit is not None:
        rows = rows.select(range(min(args.limit, len(rows))))
    return rows


def make_data(args: MakeDataArguments) -> Path:
    """Self-distilled training data in ``args.output_dir`` (resumable); returns the dataset dir."""
    datasets = require("datasets", "train")

    arguments.at_least_one(batch_size=args.batch_size, shard_size=args.shard_size,
                           max_new_tokens=args.max_new_tokens, limit=args.limit, threads=args.threads)
    dtype = arguments.dtype(args.dtype)
    out = arguments.output_dir(args.output_dir)
    prompts = _sources(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = {k: v for k, v in asdict(args).items() if k not in ("output_dir", "batch_size", "threads")}
    if args.answers is None:
        settings.update(prompts=str(Path(args.prompts).resolve()), num_prompts=len(prompts))
    else:
        source = manifest_of(args.answers).get("settings", {})
        settings.update(prompts=source.get("prompts"), answers=str(Path(args.answers).resolve()),
                        answers_model=source.get("model"), num_prompts=len(prompts))
    manifest = {"settings": settings, "shards": [], "seconds": 0.0, "done": False}
    if (out / MANIFEST).is_file():
        old = json.loads((out / MANIFEST).read_text())
        if {k: v for k, v in old["settings"].items() if k != "layers"} != settings:
            changed = sorted(k for k in settings if old["settings"].get(k) != settings[k])
            raise ValueError(f"{out} holds data made with other settings ({', '.join(changed)} differ); use the same "
                             "arguments to resume it, or another --output-dir")
        manifest = old
    if manifest["done"] and (out / DATASET_DIR).is_dir():
        return out / DATASET_DIR

    model, tok = load_model(args.model, dtype=dtype)
    layers = parse_layers(args.hidden_layers, int(model.config.num_hidden_layers))
    manifest["settings"]["layers"] = list(layers)  # what --hidden-layers meant for this target
    if args.answers is not None:
        vocab = model.get_output_embeddings().weight.shape[0]
        if max(int(max(ids)) for ids in prompts["input_ids"]) >= vocab:
            raise ValueError(f"--answers {args.answers} holds token ids outside {args.model}'s vocabulary of {vocab}: "
                             "it was made with another tokenizer; rescore answers of a model sharing this tokenizer")
    out.mkdir(parents=True, exist_ok=True)
    done = max((s["end"] for s in manifest["shards"]), default=0)
    if args.answers is None:
        ids = [_chat_ids(tok, p) for p in prompts[done:]]
        answers, finished = _greedy(model, ids, args.max_new_tokens, args.batch_size), {}
    for start in tqdm(range(done, len(prompts), args.shard_size), desc="make-data shards", unit="shard"):
        end = min(start + args.shard_size, len(prompts))
        t0 = time.perf_counter()
        if args.answers is not None:
            rows = _rescore_shard(model, prompts[start:end], args, layers)
        else:
            shard = range(start - done, end - done)  # indices into ids
            while any(i not in finished for i in shard):  # answers finish in any order
                i, answer = next(answers)
                finished[i] = answer
            rows = _shard_rows(model, [ids[i] for i in shard], [finished.pop(i) for i in shard], args, layers)
        name = f"shard-{start:07d}"
        _save_dataset(datasets.Dataset.from_dict(rows, features=_features(model, args, layers)),
                      out / "shards" / name)
        manifest["shards"].append({"name": name, "start": start, "end": end})
        manifest["seconds"] += time.perf_counter() - t0
        _write_json(out / MANIFEST, manifest)

    shards = [datasets.load_from_disk(str(out / "shards" / s["name"])) for s in manifest["shards"]]
    full = datasets.concatenate_datasets(shards)
    _save_dataset(full, out / DATASET_DIR)
    lengths = torch.tensor([len(x) for x in full["input_ids"]])
    prompt_lengths = torch.tensor(full["prompt_length"])
    manifest.update(done=True, examples=full.num_rows, prompt_tokens=int(prompt_lengths.sum()),
                    answer_tokens=int((lengths - prompt_lengths).sum()))
    _write_json(out / MANIFEST, manifest)
    return out / DATASET_DIR


def _features(model, args: MakeDataArguments, layers: tuple[int, ...]):
    d = require("datasets", "train")

    cols = {"input_ids": d.Sequence(d.Value("int32")), "prompt_length": d.Value("int32")}
    if args.answers is not None:
        cols["target_ids"] = d.Sequence(d.Value("int32"))
    if args.save_hidden_states:
        width = model.config.hidden_size * len(layers)
        cols["hidden_states"] = d.Array2D(shape=(None, width), dtype="float16")
    return d.Features(cols)
