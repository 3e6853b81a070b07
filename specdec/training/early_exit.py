"""Early-exit adapter training: frozen target, the adapter learns the target's own next token.

At every answer position the target's first `exit_layer` layers (a `LayerSubset`) give the
early state h; the exit's logits are ``lm_head(adapter(norm(h)))`` with the target's frozen norm
and lm_head, and the label is the next token (self-distilled, so the target's own choice). With
``kl_weight > 0`` ``kl_weight * KL(target || exit)`` is added. The held-out evaluation reports
top-1 agreement with and without the adapter, and cross-entropy.

Boundary: the recipe for `specdec.training.train`; imports the EarlyExit drafter, the layer view,
the data module and the loop's `TrainArguments`.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from specdec.drafters import layer_view
from specdec.drafters.early_exit import EarlyExit, ExitAdapter
from specdec.training.data import Batch
from specdec.training.train import TrainArguments


@dataclass
class EarlyExitArguments:
    exit_layer: int | None = field(default=None, metadata={
        "help": "decoder layers the draft runs before the exit; unset: half the target's depth"})
    rank: int = field(default=64, metadata={"help": "width of the adapter's residual SiLU bottleneck"})
    kl_weight: float = field(default=0.0, metadata={
        "help": "add kl_weight * KL(target || exit) over the full next-token distribution (runs every target "
                "layer per batch; 0: only cross-entropy against the target's own next token)"})


def next_token_positions(batch: Batch) -> Tensor:
    """[b, t] bool: positions whose next token exists and is an answer token (the labelled ones)."""
    return F.pad(batch.answer_mask[:, 1:], (0, 1), value=False)


def head_of(target) -> tuple[Tensor, Tensor | None]:
    """The target's lm_head as frozen tensors sharing its storage (no copy, no gradient)."""
    head = target.get_output_embeddings()
    bias = getattr(head, "bias", None)
    return head.weight.detach(), None if bias is None else bias.detach()


@dataclass
class Examples:
    normed: Tensor  # [n, hidden] the target's final norm on its state after exit_layer layers
    labels: Tensor  # [n] the target's own next token
    target_logits: Tensor | None  # [n, vocab] the full target's logits, only with kl_weight > 0


class EarlyExitRecipe:
    kind = "early-exit"
    needs_hidden_states = False  # the early state comes from the target's first layers, not its last

    def __init__(self, args: EarlyExitArguments):
        if args.exit_layer is not None and args.exit_layer < 1:
            raise ValueError(f"early-exit: --exit-layer must be >= 1, got {args.exit_layer}")
        if args.rank < 1:
            raise ValueError(f"early-exit: --rank must be >= 1, got {args.rank}")
        if args.kl_weight < 0:
            raise ValueError(f"early-exit: --kl-weight must be >= 0, got {args.kl_weight}")
        self.args = args

    def arguments(self) -> dict:
        return asdict(self.args)

    def exit_layer(self, target) -> int:
        n = target.config.num_hidden_layers
        k = self.args.exit_layer if self.args.exit_layer is not None else max(1, n // 2)
        if not 1 <= k <= n:
            raise ValueError(f"early-exit: --exit-layer must be in [1, {n}] (the target's decoder layers), got {k}")
        return k

    def build(self, target, train: TrainArguments) -> ExitAdapter:
        adapter = ExitAdapter(target.config.hidden_size, self.exit_layer(target), self.args.rank)
        return adapter.to(target.device)

    @torch.no_grad()
    def _examples(self, target, batch: Batch, exit_layer: int, full: bool) -> Examples:
        """The labelled positions of every row, each row run alone (no padding reaches the layers)."""
        view = layer_view.LayerSubset(target, range(target.config.num_hidden_layers if full else exit_layer))
        norm = target.get_decoder().norm
        labelled = next_token_positions(batch)
        normed, labels, logits = [], [], []
        for b in range(batch.input_ids.shape[0]):
            rows = labelled[b].nonzero().flatten()  # [r]
            if not rows.numel():
                continue
            length = int(batch.attention_mask[b].sum())
            ids = batch.input_ids[b, :length]
            # Only the rows up to the last labelled one matter; the lm_head runs on the last alone.
            out = view(ids[: int(rows[-1]) + 1], torch.arange(int(rows[-1]) + 1), last_only=not full,
                       return_states=True)
            normed.append(norm(out.states[exit_layer][rows][None])[0])
            labels.append(ids[rows + 1])
            if full:
                logits.append(out.logits[rows])
        hidden, device = target.config.hidden_size, batch.input_ids.device
        if not normed:
            empty = torch.zeros(0, hidden, device=device, dtype=target.dtype)
            return Examples(empty, torch.zeros(0, dtype=torch.long, device=device), None)
        return Examples(torch.cat(normed), torch.cat(labels), torch.cat(logits) if full else None)

    def loss(self, adapter, target, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        k = _unwrap(adapter).exit_layer
        ex = self._examples(target, batch, k, full=self.args.kl_weight > 0)
        if not ex.labels.numel():  # no answer token in the batch: a zero that still reaches every parameter
            return sum(p.sum() for p in adapter.parameters()) * 0.0, {"ce": 0.0}
        weight, bias = head_of(target)
        logits = F.linear(adapter(ex.normed.float()).to(weight.dtype), weight, bias).float()  # [n, vocab]
        ce = F.cross_entropy(logits, ex.labels)
        parts = {"ce": float(ce.detach())}
        loss = ce
        if ex.target_logits is not None:
            kl = F.kl_div(torch.log_softmax(logits, -1), torch.log_softmax(ex.target_logits.float(), -1),
                          log_target=True, reduction="batchmean")
            parts["kl"] = float(kl.detach())
            loss = ce + self.args.kl_weight * kl
        return loss, parts

    def evaluate(self, adapter, target, batches: Iterator[Batch]) -> dict:
        k = adapter.exit_layer
        weight, bias = head_of(target)
        positions, agree, agree_plain, ce_sum = 0, 0, 0, 0.0
        for batch in batches:
            ex = self._examples(target, batch, k, full=False)
            if not ex.labels.numel():
                continue
            plain = F.linear(ex.normed.to(weight.dtype), weight, bias).float()  # [n, vocab]
            logits = F.linear(adapter(ex.normed.float()).to(weight.dtype), weight, bias).float()
            positions += ex.labels.numel()
            agree += int((logits.argmax(-1) == ex.labels).sum())
            agree_plain += int((plain.argmax(-1) == ex.labels).sum())
            ce_sum += float(F.cross_entropy(logits, ex.labels, reduction="sum"))
        if not positions:  # nothing held out (--eval-fraction 0)
            return {"eval": {"positions": 0, "exit_layer": k}}
        metrics = {"positions": positions, "exit_layer": k, "top1": agree / positions,
                   "top1_without_adapter": agree_plain / positions, "loss": ce_sum / positions}
        print(f"early-exit: held-out top-1 agreement with the target {metrics['top1']:.3f} after {k} of "
              f"{target.config.num_hidden_layers} layers (without the adapter {metrics['top1_without_adapter']:.3f}) "
              f"over {positions} positions", file=sys.stderr)
        return {"eval": metrics}

    def save(self, adapter, target, directory: Path, metadata: dict) -> Path:
        return EarlyExit(target, adapter=adapter, metadata=metadata).save_pretrained(directory)


def _unwrap(module) -> ExitAdapter:
    """The adapter inside a DistributedDataParallel wrapper (accelerate wraps it with several processes)."""
    return getattr(module, "module", module)
