"""Medusa-1 training: frozen target, K heads, per-head cross-entropy with decay.

Head k (1-based) on the target state at position p learns the token at p + 1 + k (the target's
own generated token there: the data is self-distilled), and only where that token is part of
the answer. Head k's loss is weighted ``decay ** (k - 1)`` (Medusa's
``medusa_decay_coefficient ** i`` with 0-based i). The held-out evaluation measures, per head,
top-1 and top-k accuracy, and the per-depth, per-rank table ``accuracy[k][r]``: the chance that
head k + 1's rank-r token is right at positions where the heads before it all had the right
token in their top-k, i.e. where a tree would have reached that depth. The drafter's calibrated
tree is built from that table.

Boundary: the recipe for `specdec.training.train`; imports the Medusa drafter and the data module.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from specdec.drafters.medusa import Medusa, MedusaHeads, lm_head_of
from specdec.training.data import Batch
from specdec.trees import optimal_shape


@dataclass
class MedusaArguments:
    num_heads: int = field(default=4, metadata={"help": "heads K: the tree reaches depth K"})
    num_layers: int = field(default=1, metadata={"help": "residual SiLU blocks per head"})
    own_lm_head: bool = field(default=False, metadata={
        "help": "give each head its own lm_head (initialised from the target's) instead of sharing the frozen one"})
    decay: float = field(default=0.8, metadata={"help": "head k's loss weight is decay^(k-1)"})
    eval_topk: int = field(default=10, metadata={"help": "ranks measured per head in the accuracy table"})
    tree_budget: int = field(default=32, metadata={"help": "node budget of the calibrated tree whose expected "
                                                          "accepted tokens per step is reported"})


def shifted_targets(batch: Batch, num_heads: int) -> tuple[Tensor, Tensor]:
    """targets [b, t, K]: the token 1 + k after each position for heads k = 1..K; valid [b, t, K]:
    that token exists and is an answer token."""
    t = batch.input_ids.shape[1]
    ids = F.pad(batch.input_ids, (0, num_heads + 1))
    answer = F.pad(batch.answer_mask, (0, num_heads + 1))
    targets = torch.stack([ids[:, 1 + k : 1 + k + t] for k in range(1, num_heads + 1)], dim=-1)
    valid = torch.stack([answer[:, 1 + k : 1 + k + t] for k in range(1, num_heads + 1)], dim=-1)
    return targets, valid


class MedusaRecipe:
    kind = "medusa"
    needs_hidden_states = True

    def __init__(self, args: MedusaArguments):
        if args.num_heads < 1 or args.num_layers < 1 or args.eval_topk < 1:
            raise ValueError("medusa: --num-heads, --num-layers and --eval-topk must be >= 1")
        if not 0 < args.decay <= 1:
            raise ValueError(f"medusa: --decay must be in (0, 1], got {args.decay}")
        self.args = args

    def arguments(self) -> dict:
        return asdict(self.args)

    def build(self, target) -> MedusaHeads:
        vocab = target.get_output_embeddings().weight.shape[0]
        heads = MedusaHeads(target.config.hidden_size, self.args.num_heads, self.args.num_layers,
                            vocab if self.args.own_lm_head else None)
        heads.init_lm_heads(lm_head_of(target)[0])
        return heads.to(target.device)

    def _logits(self, heads, target, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        """Logits [n, K, vocab] at the n positions where some head has a label, with their
        targets and validity [n, K]."""
        targets, valid = shifted_targets(batch, self.args.num_heads)
        rows = valid.any(-1)  # [b, t]; skipping the rest keeps the [n, K, vocab] logits small
        return heads(batch.hidden_states[rows], *lm_head_of(target)), targets[rows], valid[rows]

    def loss(self, heads, target, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        logits, targets, valid = self._logits(heads, target, batch)
        n, k, vocab = logits.shape
        ce = F.cross_entropy(logits.reshape(n * k, vocab).float(), targets.reshape(-1), reduction="none").view(n, k)
        per_head = (ce * valid).sum(0) / valid.sum(0).clamp(min=1)  # [K]
        weights = self.args.decay ** torch.arange(k, device=per_head.device, dtype=per_head.dtype)
        return (weights * per_head).sum(), {f"loss_head{i + 1}": float(v) for i, v in enumerate(per_head.detach())}

    def evaluate(self, heads, target, batches: Iterator[Batch]) -> dict:
        k, r = self.args.num_heads, self.args.eval_topk
        positions, top1, topr, reached = (torch.zeros(k, dtype=torch.float64) for _ in range(4))
        ce_sum = torch.zeros(k, dtype=torch.float64)
        table = torch.zeros(k, r, dtype=torch.float64)
        for batch in batches:
            logits, targets, valid = self._logits(heads, target, batch)
            logits, targets, valid = logits.float().cpu(), targets.cpu(), valid.cpu()
            truth = logits.gather(-1, targets[..., None])  # [n, K, 1]
            rank = (logits > truth).sum(-1)  # [n, K]: 0 = the head's top token is right
            hit = valid & (rank < r)
            # A tree reaches depth k only where every shallower head had the right token in reach.
            before = torch.cat([torch.ones_like(hit[:, :1]), hit[:, :-1].long().cumprod(-1).bool()], dim=-1) & valid
            positions += valid.sum(0)
            top1 += (valid & (rank == 0)).sum(0)
            topr += hit.sum(0)
            reached += before.sum(0)
            table += (F.one_hot(rank.clamp(max=r), r + 1)[..., :r] * before[..., None]).sum(0)
            ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view_as(rank)
            ce_sum += (ce.double() * valid).sum(0)
        if not positions.any():  # nothing held out (--eval-fraction 0): no table, the drafter uses a preset tree
            return {"eval": {"positions": positions.long().tolist()}}
        accuracy = table / reached.clamp(min=1)[:, None]  # [K, r]
        shape = optimal_shape(accuracy, self.args.tree_budget)
        return {
            "eval": {
                "positions": positions.long().tolist(),
                "loss": (ce_sum / positions.clamp(min=1)).tolist(),
                "top1": (top1 / positions.clamp(min=1)).tolist(),
                f"top{r}": (topr / positions.clamp(min=1)).tolist(),
                "calibrated_tree_nodes": len(shape.paths),
                "expected_tokens_per_step": shape.expected_tokens,
            },
            "accuracy": accuracy.tolist(),
        }

    def save(self, heads, target, directory: Path, metadata: dict) -> Path:
        return Medusa(target, heads, accuracy=metadata.get("accuracy"), metadata=metadata).save_pretrained(directory)
