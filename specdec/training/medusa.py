"""Medusa training: Medusa-1 (frozen target, K heads) and Medusa-2 (`--joint`: heads and LoRA
adapters on the target's decoder train together).

Head k (1-based) on the state at p learns the target's own token at p + 1 + k, at answer
positions only, weighted ``decay ** (k - 1)``. The held-out evaluation gives per-head top-1 and
top-k accuracy and ``accuracy[k][r]`` (head k + 1's rank-r token right where the heads before it
all had the right token in their top-k), from which the drafter's tree is calibrated. Medusa-2
adds ``base_weight * KL(p_original || p_adapted)`` at answer positions and reports the adapted
model's agreement with the original; output is exact for the adapted model
(`specdec.drafters.medusa.adapted_target`).

Boundary: the recipe for `specdec.training.train`; imports the Medusa drafter, the data module
and the loop's `TrainArguments`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from specdec.drafters import checkpoint
from specdec.drafters.medusa import Medusa, MedusaHeads, lm_head_of, lora_config
from specdec.extras import require
from specdec.training.data import Batch
from specdec.training.train import TrainArguments
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
    joint: bool = field(default=False, metadata={
        "help": "Medusa-2: also train LoRA adapters on the target's decoder (the drafter then needs the adapted "
                "target, see specdec.drafters.medusa.adapted_target)"})
    lora_rank: int = field(default=16, metadata={"help": "--joint: LoRA rank r"})
    lora_alpha: float = field(default=32.0, metadata={"help": "--joint: LoRA scale alpha (updates scaled by alpha / "
                                                              "r)"})
    base_weight: float = field(default=1.0, metadata={
        "help": "--joint: weight of KL(original || adapted) next-token distributions, which keeps the adapted "
                "model's predictions those of the original"})


class JointMedusa(nn.Module):
    """Medusa-2's trainable module: the heads and a LoRA-adapted copy of the target's decoder."""

    def __init__(self, heads: MedusaHeads, backbone: nn.Module):
        super().__init__()
        self.heads, self.backbone = heads, backbone

    def forward(self, batch: Batch, rows: Tensor, lm_weight: Tensor, lm_bias: Tensor | None) -> tuple[Tensor, Tensor]:
        """(adapted states [b, t, hidden], head logits [n, K, vocab] at the n `rows` [b, t])."""
        states = self.backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        return states, self.heads(states[rows], lm_weight, lm_bias)


def kl_to_original(original: Tensor, adapted: Tensor) -> Tensor:
    """[n] KL(softmax(original) || softmax(adapted)) per row of [n, vocab] logits."""
    return F.kl_div(F.log_softmax(adapted.float(), -1), F.log_softmax(original.float(), -1), log_target=True,
                    reduction="none").sum(-1)


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
        if args.joint and (args.lora_rank < 1 or args.lora_alpha <= 0 or args.base_weight < 0):
            raise ValueError(f"medusa --joint: --lora-rank must be >= 1, --lora-alpha > 0 and --base-weight >= 0, got "
                             f"{args.lora_rank}, {args.lora_alpha}, {args.base_weight}")
        self.args = args
        self.lora = {"r": args.lora_rank, "lora_alpha": args.lora_alpha, "target_modules": "all-linear"}

    def arguments(self) -> dict:
        return asdict(self.args)

    def build(self, target, train: TrainArguments) -> MedusaHeads:
        vocab = target.get_output_embeddings().weight.shape[0]
        heads = MedusaHeads(target.config.hidden_size, self.args.num_heads, self.args.num_layers,
                            vocab if self.args.own_lm_head else None)
        heads.init_lm_heads(lm_head_of(target)[0])
        if not self.args.joint:
            return heads.to(target.device)
        decoder = copy.deepcopy(target.get_decoder()).float()  # a copy: the frozen target stays the original
        decoder.requires_grad_(False)
        return JointMedusa(
            heads, require("peft", "train").get_peft_model(decoder, lora_config({"lora": self.lora}))
        ).to(target.device)

    def _logits(self, module, target, batch: Batch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Logits [n, K, vocab] at the n positions where some head has a label, with their
        targets and validity [n, K], and the states [b, t, hidden] the heads read."""
        targets, valid = shifted_targets(batch, self.args.num_heads)
        rows = valid.any(-1)  # [b, t]; skipping the rest keeps the [n, K, vocab] logits small
        if self.args.joint:
            states, logits = module(batch, rows, *lm_head_of(target))
        else:
            states = batch.hidden_states
            logits = module(states[rows], *lm_head_of(target))
        return logits, targets[rows], valid[rows], states

    def _kl(self, target, batch: Batch, states: Tensor) -> tuple[Tensor, Tensor]:
        """Medusa-2: [m] KL(original || adapted) and top-1 agreement at the m answer positions."""
        mask = F.pad(batch.answer_mask[:, 1:], (0, 1), value=False)  # the next token is an answer token
        original = F.linear(batch.hidden_states[mask].to(states.dtype), *lm_head_of(target))  # [m, vocab]
        adapted = F.linear(states[mask], *lm_head_of(target))
        return kl_to_original(original, adapted), original.argmax(-1) == adapted.argmax(-1)

    def loss(self, module, target, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        logits, targets, valid, states = self._logits(module, target, batch)
        n, k, vocab = logits.shape
        ce = F.cross_entropy(logits.reshape(n * k, vocab).float(), targets.reshape(-1), reduction="none").view(n, k)
        per_head = (ce * valid).sum(0) / valid.sum(0).clamp(min=1)  # [K]
        weights = self.args.decay ** torch.arange(k, device=per_head.device, dtype=per_head.dtype)
        total, parts = (
            (weights * per_head).sum(),
            {f"loss_head{i + 1}": float(v) for i, v in enumerate(per_head.detach())},
        )
        if self.args.joint:
            kl = self._kl(target, batch, states)[0].mean()
            total, parts["loss_kl"] = total + self.args.base_weight * kl, float(kl.detach())
        return total, parts

    def evaluate(self, heads, target, batches: Iterator[Batch]) -> dict:
        k, r = self.args.num_heads, self.args.eval_topk
        positions, top1, topr, reached = (torch.zeros(k, dtype=torch.float64) for _ in range(4))
        ce_sum = torch.zeros(k, dtype=torch.float64)
        table = torch.zeros(k, r, dtype=torch.float64)
        kl_sum = agree = answers = 0.0
        for batch in batches:
            logits, targets, valid, states = self._logits(heads, target, batch)
            if self.args.joint:
                kl, same = self._kl(target, batch, states)
                kl_sum, agree, answers = kl_sum + float(kl.sum()), agree + float(same.sum()), answers + kl.numel()
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
        joint = {"original_top1_agreement": agree / max(answers, 1), "kl_to_original": kl_sum / max(answers, 1)}
        return {
            "eval": {
                **(joint if self.args.joint else {}),
                "positions": positions.long().tolist(),
                "loss": (ce_sum / positions.clamp(min=1)).tolist(),
                "top1": (top1 / positions.clamp(min=1)).tolist(),
                f"top{r}": (topr / positions.clamp(min=1)).tolist(),
                "calibrated_tree_nodes": len(shape.paths),
                "expected_tokens_per_step": shape.expected_tokens,
            },
            "accuracy": accuracy.tolist(),
        }

    def save(self, module, target, directory: Path, metadata: dict) -> Path:
        if not self.args.joint:
            return Medusa(target, module, accuracy=metadata.get("accuracy"), metadata=metadata).save_pretrained(
                directory
            )
        state = require("peft", "train").get_peft_model_state_dict(module.backbone)
        lora = {k: v.detach().cpu().clone() for k, v in state.items()}
        adapted = copy.deepcopy(target)  # the target the heads read: the adapter merged into its decoder
        adapted.get_decoder().load_state_dict(copy.deepcopy(module.backbone).merge_and_unload().state_dict())
        metadata = {**metadata, "backbone": {"lora": self.lora, "fingerprint": checkpoint.fingerprint(adapted)}}
        return Medusa(adapted, module.heads, accuracy=metadata.get("accuracy"), metadata=metadata,
                      backbone_lora=lora).save_pretrained(directory)
