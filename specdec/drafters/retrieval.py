"""Retrieval drafting (REST, He et al. 2023): continuations of the context's longest suffix found in a corpus.

A `Datastore` is built once from tokenized documents: the tokens (each document followed by a
separator, -1, that sorts below every token, so matches never cross documents) and a suffix
array, on disk as ``tokens.npy``, ``suffixes.npy`` and ``datastore.json``; `Datastore.open`
memory-maps them. A query finds the longest matching suffix of up to `max_suffix` tokens by
bisection, reads what followed up to `max_matches` occurrences and merges them into a trie
scored by each node's share of continuations. `Retrieval` drafts from it: training-free and
model-free, the node count chosen by the sizing rule with a running calibration of the scores.

Boundary: numpy, torch (the trees) and `specdec.trees`; no model. The corpus reader and
`encode_corpus` take any tokenizer-like object; loading one is the CLI's job.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from specdec.drafter import Context, Feedback
from specdec.trees import LinearCost, RunningRate, TokenTree, best_size

FORMAT = "specdec-datastore"
VERSION = 1
SEPARATOR = -1  # after every document in tokens.npy; below every token id, so it matches nothing
_REBUILD = "rebuild it with `specdec datastore build --model MODEL --corpus FILE --out DIR`"


def suffix_array(values: np.ndarray) -> np.ndarray:
    """[N] int64: start positions of all suffixes of `values` (any integers) in lexicographic
    order, a suffix that is a prefix of another first. Prefix doubling: round r sorts the suffixes
    by their first 2^r values, as pairs (rank of the first half, rank of the second half) packed
    into one int64 key; it stops once all ranks differ, so the rounds are log2 of the longest
    repeat. Peak memory is about 8 int64 arrays of length N."""
    values = np.asarray(values).reshape(-1)
    n = values.size
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if n >= 2**31:
        raise ValueError(f"suffix_array: {n} values; at most 2**31 - 1 are supported")
    _, rank = np.unique(values, return_inverse=True)  # dense ranks 0..u-1
    rank = rank.astype(np.int64).reshape(-1)
    span = 1
    while True:
        # 0 stands for "past the end", so a suffix sorts before its extensions.
        key = rank * (n + 1)
        key[: n - span] += rank[span:] + 1
        order = np.argsort(key)  # equal keys get equal ranks, so an unstable sort is fine
        key = key[order]
        rank = np.empty(n, dtype=np.int64)
        rank[order] = np.concatenate(([0], np.cumsum(key[1:] != key[:-1])))
        if int(rank[order[-1]]) == n - 1:  # all ranks distinct: fully sorted
            return order
        span *= 2


class Datastore:
    """A tokenized corpus with its suffix array, memory-mapped from a directory."""

    def __init__(self, path: Path, tokens: np.ndarray, suffixes: np.ndarray, meta: dict):
        self.path = path
        self.tokens = tokens  # [N] int32, SEPARATOR after every document
        self.suffixes = suffixes  # [M] suffix starts (separators excluded), sorted
        self.meta = meta

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def model_name(self) -> str:
        return str(self.meta["model"])

    def __repr__(self) -> str:
        return (f"Datastore({str(self.path)!r}, {self.meta['documents']} documents, "
                f"{self.meta['num_tokens']} tokens, model {self.model_name!r})")

    # ---- building ------------------------------------------------------------------------
    @classmethod
    def build(
        cls, token_sequences: Iterable, out_dir: str | os.PathLike, *, vocab_size: int, model_name: str,
        description: str = "",
    ) -> Datastore:
        """Write a datastore of `token_sequences` (one document each; ints, arrays or tensors) to
        `out_dir` and open it. `vocab_size`: the target's vocabulary (rows of its output
        embedding); every token must lie in [0, vocab_size). The files are written into a fresh
        directory beside `out_dir` and renamed into place at the end, so a failed or interrupted
        build leaves nothing at `out_dir`; an existing datastore there is replaced, any other
        non-empty directory or file is refused. `model_name` and `description` (the corpus) are
        recorded in datastore.json for people; only `vocab_size` is checked against a target."""
        out = Path(out_dir)
        if vocab_size < 1:
            raise ValueError(f"Datastore.build: vocab_size must be >= 1, got {vocab_size}")
        cls.check_writable(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{out.name}.building.", dir=out.parent))
        try:
            chunks: list[np.ndarray] = []
            documents = 0
            for i, seq in enumerate(token_sequences):
                doc = np.asarray(seq, dtype=np.int64).reshape(-1)
                if doc.size == 0:
                    continue
                if int(doc.min()) < 0 or int(doc.max()) >= vocab_size:
                    raise ValueError(f"Datastore.build: document {i} holds token ids outside [0, {vocab_size}); "
                                     "tokenize the corpus with the target's tokenizer")
                chunks += [doc.astype(np.int32), np.array([SEPARATOR], dtype=np.int32)]
                documents += 1
            if not documents:
                raise ValueError("Datastore.build: the corpus holds no tokens; give at least one non-empty document")
            tokens = np.concatenate(chunks)  # [N]
            del chunks
            # Each separator gets its own value below all tokens, so no comparison runs past a
            # document's end: the sort needs log2(longest repeat within a document) rounds.
            is_sep = tokens < 0
            values = tokens.astype(np.int64)
            values[is_sep] = np.arange(documents, dtype=np.int64) - documents
            order = suffix_array(values)
            del values
            suffixes = order[~is_sep[order]]  # [N - documents]: a query never starts at a separator
            suffixes = suffixes.astype(np.int32 if tokens.size < 2**31 else np.int64)
            np.save(work / "tokens.npy", tokens)
            np.save(work / "suffixes.npy", suffixes)
            meta = dict(format=FORMAT, version=VERSION, vocab_size=int(vocab_size), model=str(model_name),
                        num_tokens=int(tokens.size), num_suffixes=int(suffixes.size), documents=documents,
                        description=description)
            (work / "datastore.json").write_text(json.dumps(meta, indent=2) + "\n")
            _publish(work, out)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        return cls.open(out)

    @staticmethod
    def check_writable(out_dir: str | os.PathLike) -> None:
        """Raise FileExistsError unless `out_dir` is absent, empty or a datastore (which a build replaces)."""
        _check_replaceable(Path(out_dir))

    # ---- opening -------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike) -> Datastore:
        """Memory-map a built datastore; clear errors (naming the file and the fix) otherwise."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"datastore {str(path)!r} does not exist or is not a directory; build one with "
                                    "`specdec datastore build --model MODEL --corpus FILE --out DIR`")
        meta_path = path / "datastore.json"
        try:
            meta = json.loads(meta_path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"datastore {str(path)!r}: {meta_path.name} is missing; {_REBUILD}") from None
        except (OSError, ValueError) as err:
            raise ValueError(f"datastore {str(path)!r}: {meta_path.name} is unreadable ({err}); {_REBUILD}") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ValueError(f"datastore {str(path)!r}: {meta_path.name} is not a specdec datastore description; "
                             f"{_REBUILD}")
        if meta.get("version") != VERSION:
            raise ValueError(f"datastore {str(path)!r} has format version {meta.get('version')!r}, this specdec reads "
                             f"version {VERSION}; {_REBUILD}")
        missing = [k for k in ("vocab_size", "model", "num_tokens", "num_suffixes", "documents") if k not in meta]
        if missing:
            raise ValueError(f"datastore {str(path)!r}: {meta_path.name} lacks {', '.join(missing)}; {_REBUILD}")
        tokens = _load(path / "tokens.npy", (np.int32,), meta["num_tokens"])
        suffixes = _load(path / "suffixes.npy", (np.int32, np.int64), meta["num_suffixes"])
        if tokens.size == 0 or int(tokens[-1]) != SEPARATOR or suffixes.size + meta["documents"] != tokens.size:
            raise ValueError(f"datastore {str(path)!r}: tokens.npy and suffixes.npy do not fit together; {_REBUILD}")
        return cls(path, tokens, suffixes, meta)

    # ---- queries -------------------------------------------------------------------------
    def _prefix(self, i: int, n: int) -> list[int]:
        start = int(self.suffixes[i])
        return self.tokens[start : start + n].tolist()

    def _bound(self, pattern: list[int], lo: int, hi: int, upper: bool) -> int:
        """First suffix index in [lo, hi) whose first len(pattern) tokens are >= pattern
        (> pattern with `upper`); a shorter suffix compares as smaller, separators as below all."""
        n = len(pattern)
        while lo < hi:
            mid = (lo + hi) // 2
            head = self._prefix(mid, n)
            if head < pattern or (upper and head == pattern):
                lo = mid + 1
            else:
                hi = mid
        return lo

    def find(self, pattern) -> tuple[int, int]:
        """[lo, hi): the suffix-array rows whose suffixes start with `pattern` (empty: lo == hi)."""
        pattern = [int(t) for t in pattern]
        lo = self._bound(pattern, 0, self.suffixes.size, upper=False)
        return lo, self._bound(pattern, lo, self.suffixes.size, upper=True)

    def longest_match(self, context, max_suffix: int, min_suffix: int = 1) -> tuple[int, int, int]:
        """(n, lo, hi) for the longest n in [min_suffix, max_suffix] whose last-n-token suffix of
        `context` occurs; n = 0 (and lo == hi) when none does."""
        ids = [int(t) for t in np.asarray(context).reshape(-1)[-max_suffix:]] if max_suffix > 0 else []
        best = (0, 0, 0)
        lo_n, hi_n = min_suffix, min(max_suffix, len(ids))
        while lo_n <= hi_n:  # occurrences shrink as n grows, so bisect on n
            n = (lo_n + hi_n) // 2
            lo, hi = self.find(ids[len(ids) - n :])
            if hi > lo:
                best, lo_n = (n, lo, hi), n + 1
            else:
                hi_n = n - 1
        return best

    def continuations(self, starts: np.ndarray, depth: int) -> list[np.ndarray]:
        """The up-to-`depth` tokens from each position in `starts`, each cut at its document's end."""
        if depth < 1 or not len(starts):
            return [np.zeros(0, dtype=np.int64) for _ in starts]
        # tokens ends with a separator, so clipping reads a separator and the cut below applies.
        idx = np.minimum(np.asarray(starts, dtype=np.int64)[:, None] + np.arange(depth), self.tokens.size - 1)
        windows = np.asarray(self.tokens[idx], dtype=np.int64)  # [m, depth]
        ends = np.where((windows < 0).any(axis=1), (windows < 0).argmax(axis=1), depth)
        return [w[:e] for w, e in zip(windows, ends.tolist())]

    def retrieve(self, context, *, max_suffix: int, min_suffix: int, max_matches: int, depth: int) -> TokenTree:
        """The trie of continuations of the longest matching suffix of `context`, all nodes,
        with ``scores`` = share of the retrieved continuations passing through each node. The
        occurrences read are `max_matches` evenly spaced rows of the suffix-array range: the
        range is sorted by continuation, so even spacing samples each continuation about in
        proportion to its frequency (the first rows would favour the smallest token ids)."""
        n, lo, hi = self.longest_match(context, max_suffix, min_suffix)
        count = hi - lo
        if count == 0 or depth < 1:
            return TokenTree.empty()
        m = min(count, max_matches)
        rows = lo + (np.arange(m, dtype=np.int64) * count) // m
        conts = self.continuations(np.asarray(self.suffixes[rows], dtype=np.int64) + n, depth)
        tokens: list[int] = []
        parents: list[int] = []
        hits: list[int] = []
        index: dict[tuple[int, int], int] = {}  # (parent, token) -> node
        for cont in conts:
            parent = -1
            for tok in cont.tolist():
                node = index.get((parent, tok))
                if node is None:
                    node = index[(parent, tok)] = len(tokens)
                    tokens.append(tok)
                    parents.append(parent)
                    hits.append(0)
                hits[node] += 1
                parent = node
        if not tokens:
            return TokenTree.empty()
        return TokenTree(tokens, parents, scores=torch.tensor(hits, dtype=torch.float64) / m)


def _check_replaceable(out: Path) -> None:
    if out.is_dir():
        entries = list(out.iterdir())
        if entries and not (out / "datastore.json").is_file():
            raise FileExistsError(f"--out {str(out)!r} is a non-empty directory that holds no datastore; "
                                  "pick a new directory (a datastore there would be replaced)")
    elif out.exists():
        raise FileExistsError(f"--out {str(out)!r} exists and is not a directory; pick a new directory")


def _publish(work: Path, out: Path) -> None:
    """Rename the finished build to `out`. A datastore already there is moved aside first and
    deleted after, so `out` never holds a mix of old and new files."""
    if out.exists():
        _check_replaceable(out)  # again: something may have appeared during the build
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
        os.replace(out, old / "store")
        os.rename(work, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(work, out)


def _load(path: Path, dtypes: tuple, size: int) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"datastore file {str(path)!r} is missing; {_REBUILD}")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ValueError(f"datastore file {str(path)!r} is corrupt ({err}); {_REBUILD}") from None
    if arr.ndim != 1 or arr.dtype not in dtypes or arr.size != size:
        raise ValueError(f"datastore file {str(path)!r} holds {arr.dtype} {arr.shape}, expected {size} values of "
                         f"{' or '.join(np.dtype(d).name for d in dtypes)}; {_REBUILD}")
    return arr.view(np.ndarray)  # the mmap-backed buffer without np.memmap's per-slice overhead


# ---- corpora -------------------------------------------------------------------------------
def read_corpus(
    path: str | os.PathLike, fields: tuple[str, ...] = ("text",), limit: int | None = None
) -> Iterator[list[str]]:
    """Records of a corpus file, each a list of strings. ``.jsonl``: one JSON object a line; a
    record is the values of `fields` in order, each a string or a list of strings (Spec-Bench's
    ``turns``). ``.txt``: a record per blank-line-separated block. `limit`: at most this many records."""
    path = Path(path)
    # Checked now, not on the first next(): the caller may load a tokenizer before reading.
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    if path.suffix not in (".jsonl", ".txt"):
        raise ValueError(f"--corpus {str(path)!r}: expected a .jsonl or .txt file")
    if not path.is_file():
        raise FileNotFoundError(f"--corpus {str(path)!r} does not exist")
    records = _read_jsonl(path, fields) if path.suffix == ".jsonl" else _read_txt(path)
    return records if limit is None else itertools.islice(records, limit)


def read_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """(line number from 1, text) of each line of a UTF-8 file (CRLF read as LF); a line
    that is not UTF-8 is refused as ``path:line``, so the user knows which line to fix."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"{path}:{n}: not UTF-8 text (byte {raw[err.start]:#04x} at column {err.start + 1}); "
                                 "save the file as UTF-8") from None
            yield n, text.replace("\r\n", "\n")


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """(line number from 1, value) of each non-blank line of a ``.jsonl`` file; a line that is not
    UTF-8 or not JSON is refused as ``path:line`` (json's own "line 1 column c" counts within the line)."""
    for n, line in read_lines(path):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{n}: not valid JSON ({err.msg} at column {err.colno})") from None


def _read_jsonl(path: Path, fields: tuple[str, ...]) -> Iterator[list[str]]:
    for line_no, obj in read_jsonl(path):
        if not isinstance(obj, dict) or not set(fields) <= obj.keys():
            have = ", ".join(obj) if isinstance(obj, dict) else type(obj).__name__
            raise ValueError(f"{path}:{line_no}: a record needs field(s) {', '.join(fields)} (it has {have}); "
                             "choose them with --field NAME[,NAME...]")
        texts: list[str] = []
        for name in fields:
            value = obj[name]
            if isinstance(value, str):
                texts.append(value)
            elif isinstance(value, list) and all(isinstance(v, str) for v in value):
                texts += value
            else:
                raise ValueError(f"{path}:{line_no}: field {name!r} must be a string or a list of strings")
        yield texts


def _read_txt(path: Path) -> Iterator[list[str]]:
    block: list[str] = []
    for _, line in read_lines(path):
        if line.strip():
            block.append(line)
        elif block:
            yield ["".join(block).rstrip("\n")]
            block = []
    if block:
        yield ["".join(block).rstrip("\n")]


def encode_corpus(tokenizer, records: Iterable[list[str]], *, chat: bool = False) -> Iterator[list[int]]:
    """Token ids of the documents, for `Datastore.build`. Without `chat` every string is a
    document, tokenized without special tokens. With `chat` a record is one conversation, its
    strings alternating user and assistant turns, formatted by the tokenizer's chat template as
    the target sees it while generating (role markers included, so the context "...assistant\\n"
    retrieves how answers begin); a record ending on a user turn gets the generation prompt."""
    if chat and not getattr(tokenizer, "chat_template", None):
        raise ValueError("--chat: this tokenizer has no chat template; drop --chat to store the plain text")
    for texts in records:
        if chat:
            messages = [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(texts)]
            if messages:
                text = tokenizer.apply_chat_template(
                    messages, add_generation_prompt=messages[-1]["role"] == "user", tokenize=False
                )
                yield tokenizer(text, add_special_tokens=False).input_ids
        else:
            for text in texts:
                yield tokenizer(text, add_special_tokens=False).input_ids


# ---- the drafter ---------------------------------------------------------------------------
class Retrieval:
    """REST drafter: a trie of corpus continuations of the context's longest matching suffix."""

    needs_hidden_states = False
    _DECAY = 0.95
    _PRIOR = (1.0, 2.0)  # [accepted nodes, promised nodes]: calibration 0.5, weak

    def __init__(
        self, datastore: Datastore | str | os.PathLike, *, budget: int = 16, depth: int = 8, max_suffix: int = 16,
        min_suffix: int = 2, max_matches: int = 64, token_cost: float | None = None,
    ):
        """`datastore`: a `Datastore` or its directory. Each step retrieves up to `max_matches`
        continuations of length `depth` after the longest context suffix of `max_suffix` ..
        `min_suffix` tokens that the corpus holds, and proposes at most `budget` trie nodes, the
        most frequent ones. `token_cost`: extra verify cost of one more node relative to a
        one-token forward; None takes the core's curve (`Context.verify_cost`); a number overrides
        the curve; 0 always proposes `budget` nodes (REST's fixed budget)."""
        if budget < 1 or depth < 1 or max_matches < 1:
            raise ValueError(f"Retrieval: budget, depth and max_matches must be >= 1, got {budget}, {depth}, "
                             f"{max_matches}")
        if not 1 <= min_suffix <= max_suffix:
            raise ValueError(f"Retrieval: need 1 <= min_suffix <= max_suffix, got {min_suffix}, {max_suffix}")
        if token_cost is not None and token_cost < 0:
            raise ValueError(f"Retrieval: token_cost must be >= 0 or None, got {token_cost}")
        self.datastore = datastore if isinstance(datastore, Datastore) else Datastore.open(datastore)
        self.budget, self.depth = budget, depth
        self.max_suffix, self.min_suffix, self.max_matches = max_suffix, min_suffix, max_matches
        self.token_cost = token_cost
        # Accepted nodes per promised node (sum of scores); carries across generations like
        # PromptLookup's statistics: it describes the corpus against this model.
        self.stats = RunningRate(*self._PRIOR, self._DECAY)

    def __repr__(self) -> str:
        return f"Retrieval({self.datastore!r}, budget={self.budget}, depth={self.depth})"

    def begin(self, target) -> None:
        vocab = target.get_output_embeddings().out_features
        if vocab != self.datastore.vocab_size:
            raise ValueError(
                f"Retrieval: the datastore {str(self.datastore.path)!r} was built with the tokenizer of "
                f"{self.datastore.model_name!r} ({self.datastore.vocab_size} tokens) but the target's vocabulary has "
                f"{vocab} tokens; build one with the target's tokenizer: specdec datastore build --model TARGET ..."
            )

    @property
    def calibration(self) -> float:
        return self.stats.rate

    def propose(self, ctx: Context) -> TokenTree:
        depth = self.depth if ctx.max_depth is None else min(self.depth, ctx.max_depth)
        if depth < 1:
            return TokenTree.empty()
        tree = self.datastore.retrieve(ctx.input_ids.numpy(), max_suffix=self.max_suffix, min_suffix=self.min_suffix,
                                       max_matches=self.max_matches, depth=depth)
        if not len(tree):
            return tree
        scores = tree.scores.tolist()
        # A node's count never exceeds its parent's and a parent has the lower index, so this
        # order puts every node after its ancestors: any prefix of it is a valid subtree.
        order = sorted(range(len(tree)), key=lambda i: (-scores[i], i))
        size = min(self.budget, len(tree))
        if self.token_cost != 0:
            c = self.calibration
            cost = ctx.verify_cost if self.token_cost is None else LinearCost(self.token_cost)
            size = best_size([c * scores[i] for i in order[:size]], cost).n
            if size == 0:  # not worth drafting now; drift back to the prior so it is re-probed later
                self.stats.relax()
                return TokenTree.empty()
        return tree if size == len(tree) else tree.subtree(order[:size])

    def update(self, feedback: Feedback) -> None:
        tree = feedback.tree
        if not len(tree) or tree.scores is None:
            return
        self.stats.add(len(feedback.accepted_nodes), float(tree.scores.sum()))
