"""EAGLE training with EAGLE-3's "training-time test": frozen target, one-layer feature head.

Features are the target's post-norm last-layer states, what the verifier hands the drafter.
Step 1 feeds every pair with real features; step k > 1 feeds the head's own step-(k-1)
prediction of f_p with the true token, attention mirroring a depth-k draft; all steps share one
cache. Loss per step: ``feature_weight *`` smooth L1 to the real feature + ``ce_weight *``
cross-entropy on the target's own next token at answer positions, step k weighted
``step_decay ** (k - 1)``. With `draft_vocab_size` the lm_head is cut to the N most frequent
answer tokens. The held-out evaluation reports, per depth, acceptance, top-1/top-k accuracy,
both losses and the greedy chain's expected tokens per step.

Boundary: the recipe for `specdec.training.train`; imports the Eagle drafter, the data module,
the draft-vocabulary picker and the loop's `TrainArguments`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from specdec import kv
from specdec.drafters.eagle import Eagle, EagleHead, FrozenTarget, predict
from specdec.drafters.eagle3 import Eagle3Head, default_aux_layers
from specdec.training.data import Batch
from specdec.training.draft_vocab import pick_draft_vocab
from specdec.training.train import TrainArguments

IGNORE = -100  # cross_entropy's ignore_index: a label outside the draft vocabulary


@dataclass
class EagleArguments:
    unroll: int = field(default=3, metadata={
        "help": "training-time-test steps: step k drafts from the head's own step k-1 features "
                "(1: EAGLE-1 teacher forcing)"})
    step_decay: float = field(default=0.8, metadata={"help": "step k's loss weight is step_decay^(k-1)"})
    feature_weight: float = field(default=1.0, metadata={"help": "weight of the smooth-L1 feature regression"})
    ce_weight: float = field(default=0.1, metadata={
        "help": "weight of the cross-entropy of lm_head(predicted feature) against the target's next token"})
    init_from_last_layer: bool = field(default=True, metadata={
        "help": "start the head's decoder layer as a copy of the target's last layer (else fresh random weights)"})
    eval_depth: int = field(default=6, metadata={"help": "draft depths measured by the held-out evaluation"})
    eval_topk: int = field(default=5, metadata={"help": "k of the top-k accuracy reported per depth"})
    draft_vocab_size: int = field(default=0, metadata={
        "help": "0: the head scores every lm_head row; N: it trains and drafts over the N tokens the target "
                "generated most often in the training split's answers (EAGLE-3's draft vocabulary, saved in the "
                "checkpoint; a request's context tokens are added when drafting). Positions whose next token is "
                "outside it get no cross-entropy; steps cost less (the lm_head is most of a step on a small target)"})


def unroll_mask(t: int, step: int, dtype: torch.dtype, device=None) -> Tensor:
    """[1, 1, t, step * t] additive mask for step `step` (1-based) of the unroll over t positions:
    query p sees real pairs q <= p - step + 1 and, in each later step j = 2..step, the key at
    q = p - (step - j): its own anchor's chain."""
    p = torch.arange(t, device=device)[:, None]
    q = torch.arange(t, device=device)[None]
    blocks = [q <= p - step + 1] + [q == p - (step - j) for j in range(2, step + 1)]
    allowed = torch.cat(blocks, dim=1)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


def _check_unroll(args, who: str) -> None:
    """The arguments both Eagle recipes share, each refused with its flag."""
    if args.draft_vocab_size < 0:
        raise ValueError(f"{who}: --draft-vocab-size must be >= 0 (0: every token), got {args.draft_vocab_size}")
    for name in ("unroll", "eval_depth", "eval_topk"):
        if getattr(args, name) < 1:
            raise ValueError(f"{who}: --{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 < args.step_decay <= 1:
        raise ValueError(f"{who}: --step-decay must be in (0, 1], got {args.step_decay}")


def _columns(ids: Tensor, vocab_size: int) -> Tensor:
    """[vocab] token id -> its column among draft-vocabulary ids `ids`, or IGNORE."""
    column = torch.full((vocab_size,), IGNORE, dtype=torch.long)
    column[ids] = torch.arange(ids.numel())
    return column


def _shift(x: Tensor, d: int) -> Tensor:
    """[b, t] -> [b, t] with x[:, r + d] at r (False past the end)."""
    return torch.cat([x[:, d:], torch.zeros_like(x[:, :d])], dim=1)


@dataclass
class Eagle3Arguments:
    unroll: int = field(default=3, metadata={
        "help": "training-time-test steps: step k drafts from the head's own step k-1 outputs"})
    step_decay: float = field(default=0.8, metadata={"help": "step k's loss weight is step_decay^(k-1)"})
    draft_vocab_size: int = field(default=8192, metadata={
        "help": "the head's lm_head scores the N tokens the target generated most often in the training split's "
                "answers (its d2t/t2d maps); 0: the whole vocabulary"})
    intermediate_size: int = field(default=0, metadata={
        "help": "the head's MLP width (0: the target's); smaller trains and drafts faster on a CPU"})
    aux_layers: str = field(default="", metadata={
        "help": "three HF hidden-state indices the head reads, e.g. 2,14,25 (default: EAGLE-3's 2,N/2,N-3); the "
                "data's stored states must be these (make-data --hidden-layers eagle3)"})
    eval_depth: int = field(default=6, metadata={"help": "draft depths measured by the held-out evaluation"})
    eval_topk: int = field(default=5, metadata={"help": "k of the top-k accuracy reported per depth"})


class EagleRecipe:
    kind = "eagle"
    needs_hidden_states = True
    hidden_layers = (-1,)  # the target states the head reads (HF output_hidden_states indices)
    regress_features = True  # EAGLE-1/2: the head's outputs are the target's next features

    def __init__(self, args: EagleArguments):
        _check_unroll(args, "eagle")
        if args.feature_weight < 0 or args.ce_weight < 0 or args.feature_weight + args.ce_weight == 0:
            raise ValueError("eagle: --feature-weight and --ce-weight must be >= 0 and not both 0")
        self.args = args
        self._head: EagleHead | None = None  # the unwrapped module, for its cache config
        self._frozen: tuple[object, FrozenTarget] | None = None  # (target, its frozen parts)
        self._vocab: Tensor | None = None  # [V'] sorted token ids of the draft vocabulary (None: all)
        self._column: Tensor | None = None  # [vocab] token id -> its column in the draft vocabulary, or -100
        self._vocab_info: dict = {}

    def arguments(self) -> dict:
        return asdict(self.args)

    def build(self, target, train: TrainArguments) -> EagleHead:
        self._frozen = None  # a cut lm_head belongs to the vocabulary picked here
        if self.args.draft_vocab_size:
            vocab_size = target.get_output_embeddings().weight.shape[0]
            self._vocab, self._vocab_info = pick_draft_vocab(train.data, self.args.draft_vocab_size, vocab_size,
                                                             eval_fraction=train.eval_fraction, seed=train.seed)
            self._column = _columns(self._vocab, vocab_size)
        head = EagleHead.for_target(target, init_from_last_layer=self.args.init_from_last_layer)
        if target.dtype not in (torch.float32, torch.float64):
            head = head.float()  # half-precision targets: the head still trains in fp32
        self._head = head
        return head

    def _frozen_of(self, target) -> FrozenTarget:
        """The target's frozen parts, its lm_head cut to the draft vocabulary if there is one."""
        if self._frozen is None or self._frozen[0] is not target:
            frozen = FrozenTarget.of(target)
            self._frozen = (target, frozen if self._vocab is None else frozen.over(self._vocab))
        return self._frozen[1]

    def _logits(self, target, out: Tensor) -> Tensor:
        """[..., H] head outputs -> [..., vocab or V'] draft logits."""
        return self._frozen_of(target).logits(out)

    def _labels(self, batch: Batch) -> Tensor:
        """[b, t] the label at p, the target's token after x_{p+1} (x_{p+2} in self-distilled data;
        the stored `target_ids` of rescored text), as a column of the draft logits (IGNORE: a
        token outside the draft vocabulary)."""
        if batch.target_ids is not None:
            labels = F.pad(batch.target_ids[:, 1:], (0, 1))
        else:
            labels = F.pad(batch.input_ids[:, 2:], (0, 2))
        if self._column is None:
            return labels
        if self._column.device != labels.device:
            self._column = self._column.to(labels.device)  # once, not every step
        return self._column[labels]

    def _unroll(self, head, target, batch: Batch, steps: int) -> tuple[list[Tensor], Tensor]:
        """Predicted features [b, t, H] of steps 1..`steps` (entry k - 1: step k's output at p is
        its guess of f_{p+1}) and the real features [b, t, H]."""
        frozen = self._frozen_of(target)
        unwrapped = head if isinstance(head, EagleHead) else self._head  # a DDP wrapper has no config
        dtype = next(head.parameters()).dtype
        ids = batch.input_ids
        b, t = ids.shape
        real = batch.hidden_states.to(dtype)
        tokens = F.pad(ids[:, 1:], (0, 1))  # x_{p+1} at p; the last position has none (never a label)
        positions = torch.arange(t, device=ids.device)[None].expand(b, t)
        cache = kv.new_cache(unwrapped)
        feats, outs = real, []
        for k in range(1, steps + 1):
            out = predict(head, frozen, feats, tokens, positions, unroll_mask(t, k, dtype, ids.device), cache)
            outs.append(out)
            feats = F.pad(out[:, :-1], (0, 0, 1, 0))  # step k + 1 feeds at p the step-k guess of f_p (made at p - 1)
        return outs, real

    @staticmethod
    def _valid(batch: Batch, step: int) -> Tensor:
        """[b, t] positions p whose step-`step` output is scored: its anchor p - step + 1 exists
        and the label x_{p+2} is an answer token."""
        answer = batch.answer_mask
        valid = torch.zeros_like(answer)
        valid[:, step - 1 : -2] = answer[:, step + 1 :]
        return valid

    def loss(self, head, target, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        args = self.args
        outs, real = self._unroll(head, target, batch, args.unroll)
        next_real = F.pad(real[:, 1:], (0, 0, 0, 1))  # f_{p+1} at p
        labels = self._labels(batch)  # x_{p+2} at p
        feature_weight = args.feature_weight if self.regress_features else 0.0
        ce_weight = args.ce_weight if self.regress_features else 1.0
        total, parts = 0.0, {}
        for k, out in enumerate(outs, 1):
            valid = self._valid(batch, k)
            if not valid.any():
                continue
            scored = valid & (labels != IGNORE)  # [b, t]: a label the head can draft
            step_loss = out.sum() * 0.0
            if feature_weight:
                feature = F.smooth_l1_loss(out[valid], next_real[valid])
                step_loss = step_loss + feature_weight * feature
                parts[f"loss_feature{k}"] = float(feature.detach())
            if scored.any():  # else no label here is in the draft vocabulary: nothing to log as its CE
                ce = F.cross_entropy(self._logits(target, out[scored]).float(), labels[scored])
                step_loss = step_loss + ce_weight * ce
                parts[f"loss_ce{k}"] = float(ce.detach())
            total = total + args.step_decay ** (k - 1) * step_loss
        if not torch.is_tensor(total):  # no answer tokens in this batch: a zero that still has a graph
            total = sum(out.sum() for out in outs) * 0.0
        return total, parts

    def evaluate(self, head, target, batches: Iterator[Batch]) -> dict:
        depth, r = self.args.eval_depth, self.args.eval_topk
        positions, top1, topr, reached, accepted = (torch.zeros(depth, dtype=torch.float64) for _ in range(5))
        feature_sum, ce_sum, ce_n = (torch.zeros(depth, dtype=torch.float64) for _ in range(3))
        for batch in batches:
            outs, real = self._unroll(head, target, batch, depth)
            next_real = F.pad(real[:, 1:], (0, 0, 0, 1))
            labels = self._labels(batch)
            chain = torch.ones_like(batch.answer_mask)  # by anchor: the depths so far were all right
            anchored = self._valid(batch, 1)  # by anchor r: the chain's first label x_{r+2} is an answer token
            for d, out in enumerate(outs):
                valid = self._valid(batch, d + 1)
                logits = self._logits(target, out[valid]).float()  # [n, vocab or V'], only where scored
                truth = labels[valid]
                drafted = truth != IGNORE  # a label outside the draft vocabulary is never drafted: wrong
                rank = (logits > logits.gather(-1, truth.clamp(min=0)[:, None])).sum(-1)  # [n]: 0 = top-1
                positions[d] += rank.numel()
                top1[d] += float((drafted & (rank == 0)).sum())
                topr[d] += float((drafted & (rank < r)).sum())
                if self.regress_features:
                    feature_sum[d] += float(F.smooth_l1_loss(out[valid], next_real[valid],
                                                             reduction="none").mean(-1).sum())
                if drafted.any():
                    ce_sum[d] += float(F.cross_entropy(logits[drafted], truth[drafted], reduction="sum"))
                    ce_n[d] += float(drafted.sum())
                right = torch.zeros_like(valid)
                right[valid] = drafted & (rank == 0)
                # By anchor r = p - d: depth d + 1 of the chain from r is scored at p = r + d.
                valid_a, right_a = _shift(valid, d) & anchored, _shift(right, d)
                reached[d] += float((valid_a & chain).sum())
                accepted[d] += float((valid_a & chain & right_a).sum())
                chain = chain & right_a
        if not positions.any():  # nothing held out (--eval-fraction 0)
            return {"eval": {"positions": positions.long().tolist()}}
        n = positions.clamp(min=1)
        acceptance = accepted / reached.clamp(min=1)
        return {
            "eval": {
                "positions": positions.long().tolist(),
                "acceptance": acceptance.tolist(),
                "top1": (top1 / n).tolist(),
                f"top{r}": (topr / n).tolist(),
                **({"loss_feature": (feature_sum / n).tolist()} if self.regress_features else {}),
                "loss_ce": torch.where(
                    ce_n > 0, ce_sum / ce_n.clamp(min=1), float("nan")
                ).tolist(),  # labels it can draft
                "expected_chain_tokens": float(1 + acceptance.cumprod(0).sum()),
            },
        }

    def save(self, head, target, directory: Path, metadata: dict) -> Path:
        if self._vocab_info:  # a draft vocabulary was picked from the data
            metadata = {
                **metadata,
                "draft_vocab": {**self._vocab_info, "command": metadata.get("training", {}).get("command")},
            }
        return Eagle(target, head, draft_vocab=self._vocab, metadata=metadata).save_pretrained(directory)


class Eagle3Recipe(EagleRecipe):
    """EAGLE-3: an `Eagle3Head` over the fused aux-layer states, trained by cross-entropy alone
    (its outputs are its own features, not the target's) with the same training-time-test unroll."""

    kind = "eagle3"
    regress_features = False

    def __init__(self, args: Eagle3Arguments):
        _check_unroll(args, "eagle3")
        if args.intermediate_size < 0:
            raise ValueError(f"eagle3: --intermediate-size must be >= 0 (0: the target's), got "
                             f"{args.intermediate_size}")
        try:
            self._aux = tuple(int(i) for i in args.aux_layers.split(",")) if args.aux_layers.strip() else None
        except ValueError:
            raise ValueError(f"eagle3: --aux-layers takes three comma-separated ints, got {args.aux_layers!r}") \
                from None
        self.args = args
        self._head, self._frozen, self._vocab, self._column, self._vocab_info = None, None, None, None, {}
        self.hidden_layers = self._aux

    def build(self, target, train: TrainArguments) -> Eagle3Head:
        vocab_size = target.get_output_embeddings().weight.shape[0]
        ids = None
        if self.args.draft_vocab_size:
            ids, self._vocab_info = pick_draft_vocab(train.data, self.args.draft_vocab_size, vocab_size,
                                                     eval_fraction=train.eval_fraction, seed=train.seed)
        aux = self._aux or default_aux_layers(int(target.config.num_hidden_layers))
        head = Eagle3Head.for_target(target, ids, aux_layers=aux, intermediate_size=self.args.intermediate_size or None)
        if target.dtype not in (torch.float32, torch.float64):
            head = head.float()
        self._column = _columns(head.draft_ids, vocab_size)
        self._head, self.hidden_layers = head, head.aux_layers
        return head

    def _logits(self, target, out: Tensor) -> Tensor:
        return self._head.logits(out)
