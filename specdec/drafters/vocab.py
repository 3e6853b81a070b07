"""Draft vocabulary (EAGLE-3's): the lm_head rows a head-based drafter scores.

`DraftVocab` keeps a fixed set of token ids (e.g. the 8k most frequent answer tokens, stored in
the checkpoint as `VOCAB_KEY` and ``draft_vocab_size``), their lm_head rows copied once for a
contiguous matmul, plus every token of the current request's context as it appears (`admit`).
Logits come in columns; `tokens` maps a column to its token id. Probabilities normalised over
these columns overstate q a little; drafting only proposes, so outputs stay exact.

Boundary: torch, the checkpoint helpers, `specdec.packing` and `specdec.memory`; used by `Eagle`
and `Medusa`, which own one per target.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from specdec import memory
from specdec.drafters import checkpoint
from specdec.packing import PackedRoute

VOCAB_KEY = "draft_vocab"  # the checkpoint tensor holding a draft vocabulary's token ids


def checked_vocab(ids: Tensor, vocab_size: int, who: str) -> Tensor:
    """`ids` as sorted unique long token ids, or a ValueError naming what is wrong."""
    if not isinstance(ids, Tensor) or ids.dim() != 1 or ids.numel() == 0 or ids.is_floating_point():
        raise ValueError(f"{who}: draft_vocab must be a non-empty 1-D integer tensor of token ids")
    ids = ids.long().cpu().unique()
    if int(ids[0]) < 0 or int(ids[-1]) >= vocab_size:
        raise ValueError(f"{who}: draft_vocab holds ids outside the target's vocabulary [0, {vocab_size}); "
                         "build it from data tokenized for this target")
    return ids


def rows(weight: Tensor, bias: Tensor | None, ids: Tensor) -> tuple[Tensor, Tensor | None]:
    """The lm_head rows ([len(ids), H] weight, bias) of token ids `ids`, copied out contiguously."""
    index = ids.to(weight.device)
    return weight.index_select(0, index), None if bias is None else bias.index_select(0, index)


def stored(config: dict, tensors: dict[str, Tensor], ids: Tensor | None) -> tuple[dict, dict[str, Tensor]]:
    """A drafter's checkpoint config and tensors with the draft vocabulary `ids` added (if any)."""
    if ids is None:
        return config, tensors
    return {**config, "draft_vocab_size": ids.numel()}, {**tensors, VOCAB_KEY: ids}


def stripped(ckpt: checkpoint.Checkpoint, directory, vocab_size: int) -> tuple[checkpoint.Checkpoint, Tensor | None]:
    """(`ckpt` without its draft vocabulary, that vocabulary or None); a vocabulary that disagrees
    with the config or the target means a corrupt checkpoint."""
    tensors, config = dict(ckpt.tensors), dict(ckpt.config)
    ids, size = tensors.pop(VOCAB_KEY, None), config.pop("draft_vocab_size", None)
    if ids is not None or size is not None:
        try:
            if ids is not None:
                checked_vocab(ids, vocab_size, "the checkpoint")
            if ids is None or ids.numel() != size:
                raise ValueError(f"its config says draft_vocab_size={size} but it holds "
                                 f"{0 if ids is None else ids.numel()} draft-vocabulary ids")
        except ValueError as e:
            raise checkpoint.CheckpointError(f"drafter checkpoint {str(directory)!r} is corrupt: its weights do not "
                                             f"match its config ({e})") from None
    return dataclasses.replace(ckpt, tensors=tensors, config=config), ids


class DraftVocab:
    """The rows scored over one target's lm_head (`weight` [vocab, H], `bias`): `ids`' and each
    request's context tokens; with ``ids=None`` every row, and `tokens` is None (column = id)."""

    def __init__(self, weight: Tensor, bias: Tensor | None, ids: Tensor | None, who: str = "drafter"):
        self._weight, self._bias = weight, bias
        self.ids = None if ids is None else checked_vocab(ids, weight.shape[0], who)
        if self.ids is not None and weight.device.type == "cpu":
            row = weight.shape[1] * weight.element_size() + (0 if bias is None else bias.element_size())
            memory.require(self.ids.numel() * row, f"{who}: copying draft_vocab's {self.ids.numel()} lm_head rows",
                           "use a smaller draft vocabulary, or none (draft_vocab=None scores the target's own "
                           "lm_head without a copy)")
        self._base = None if self.ids is None else rows(weight, bias, self.ids)
        self._own = False
        self.reset()

    @classmethod
    def own(cls, lm_head: nn.Linear, ids: Tensor) -> DraftVocab:
        """A head's own lm_head ([V', H]), column j scoring token ``ids[j]``: nothing is copied
        and no context token is admitted (the head has no rows for them)."""
        vocab = cls.__new__(cls)
        vocab._weight, vocab._bias, vocab.ids, vocab._base, vocab._own = lm_head.weight, lm_head.bias, ids, None, True
        vocab.reset()
        return vocab

    def reset(self) -> None:
        """Forget the last request's context tokens."""
        if self._own:
            self.tokens, self._blocks = self.ids, [(self._weight, self._bias)]
            return
        if self.ids is None:
            self.tokens, self._blocks = None, [(self._weight, self._bias)]
            return
        self.tokens = self.ids  # [V' + c] token id of each column
        self._blocks = [self._base, rows(self._weight, self._bias, self.ids[:0])]  # the context block starts empty
        self._admitted = 0  # context tokens already admitted
        self._in_vocab = torch.zeros(self._weight.shape[0], dtype=torch.bool)
        self._in_vocab[self.ids] = True

    def admit(self, ids: Tensor) -> None:
        """Add the context's tokens the vocabulary lacks to the context block. Within a request
        (`reset` ends it) the context only grows, so only its tokens since the last call are read."""
        if self.ids is None or self._own:
            return
        fresh = ids[self._admitted:] if self._admitted <= ids.numel() else ids
        self._admitted = ids.numel()
        fresh = fresh.cpu()
        new = fresh[~self._in_vocab[fresh]].unique()
        if new.numel():
            self._in_vocab[new] = True
            self.tokens = torch.cat([self.tokens, new])
            (weight, bias), (more_w, more_b) = self._blocks[1], rows(self._weight, self._bias, new)
            self._blocks[1] = (torch.cat([weight, more_w]), None if bias is None else torch.cat([bias, more_b]))

    def logits(self, feats: Tensor) -> Tensor:
        """[..., H] features -> [..., V' + c] logits of the scored rows, in `tokens`' order."""
        return torch.cat([F.linear(feats.to(w.dtype), w, b) for w, b in self._blocks if w.shape[0]], dim=-1)

    @property
    def fixed_weights(self) -> list[Tensor]:
        """The copied rows of the fixed ids, worth packing once; none for every row (the target's
        own lm_head weight, not copied). The context block changes with each request and is
        scored as it is."""
        return [] if self._base is None else [self._base[0]]

    def token_ids(self, columns: Tensor) -> Tensor:
        """Columns of `logits` (on the host) -> token ids (on the host, where `tokens` lives)."""
        return columns if self.tokens is None else self.tokens[columns]


class PackedDraft:
    """``with route(rows): ...`` runs a head-based drafter's forward over `rows` rows with oneDNN-
    prepacked linears (`specdec.packing`) when ``rows >= packed_from``: the head module's weights
    and the vocabulary's fixed rows, packed on first use. Drafts put a few rows at a time through
    small weights, where MKL's fp32 matmul is slowest. Scoring every row (no draft vocabulary) stays
    on the stock path: packing the target's lm_head again would copy it."""

    def __init__(self, head: nn.Module, vocab: DraftVocab, packed_from: int | None):
        self.parts = (head, vocab, packed_from)
        self._route: PackedRoute | None = None  # packed on first use, not for drafters never run

    def rebuilt(self, head: nn.Module, vocab: DraftVocab, packed_from: int | None) -> PackedDraft:
        """This route when built from the same parts, else a new one (packing reads every weight)."""
        same = self.parts[0] is head and self.parts[1] is vocab and self.parts[2] == packed_from
        return self if same else PackedDraft(head, vocab, packed_from)

    @contextlib.contextmanager
    def __call__(self, rows: int):
        if self._route is None:
            head, vocab, packed_from = self.parts
            self._route = PackedRoute(head, packed_from, vocab.fixed_weights)
        with self._route(rows):
            yield
