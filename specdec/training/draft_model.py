"""Draft-model distillation: a smaller LM with the target's vocabulary learns the target's
next-token distribution, for `specdec.drafters.DraftModel`.

Loss at every answer position: ``T^2 * KL(softmax(target / T) || softmax(draft / T))`` against
the frozen target, plus optionally ``ce_weight *`` cross-entropy on the target's own token. All
weights train, or (``--lora``) LoRA adapters via `peft`, merged when saved. Output:
``<output_dir>/drafter/``, a plain HF model directory (written atomically) loadable with
`specdec.models.load_model`, and ``distillation.json`` with held-out top-1 agreement and KL
before and after training.

Boundary: the recipe for `specdec.training.train`; imports model loading, the data module, the
loop's `TrainArguments` and the checkpoint's atomic writer; no drafter.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from specdec.drafters import checkpoint
from specdec.extras import require
from specdec.models import load_model
from specdec.training import arguments
from specdec.training.data import Batch
from specdec.training.train import TrainArguments

REPORT = "distillation.json"


@dataclass
class DraftModelArguments:
    draft: str = field(metadata={
        "help": "required: the smaller LM to distil, with the target's vocabulary (embedded name, HF directory or hub "
                "id)"})
    lora: bool = field(default=False, metadata={
        "help": "train LoRA adapters (peft) on every linear layer instead of every weight; merged when saved"})
    lora_rank: int = field(default=16, metadata={"help": "LoRA rank r"})
    lora_alpha: float = field(default=32.0, metadata={"help": "LoRA scale alpha (updates are scaled by alpha / r)"})
    temperature: float = field(default=1.0, metadata={"help": "softmax temperature T of both distributions in the KL"})
    ce_weight: float = field(default=0.0, metadata={
        "help": "add ce_weight * cross-entropy against the target's own next token (0: KL only)"})
    save_dtype: str = field(default="float32", metadata={"help": "dtype of the saved weights: float32, bfloat16 or "
                                                                 "float16"})


def _vocab(model) -> int:
    return model.get_output_embeddings().weight.shape[0]


def labelled(batch: Batch) -> Tensor:
    """[b, t] bool: positions whose next token exists and is an answer token."""
    return F.pad(batch.answer_mask[:, 1:], (0, 1), value=False)


class DraftModelRecipe:
    kind = "draft-model"
    needs_hidden_states = False

    def __init__(self, args: DraftModelArguments):
        if not args.draft:
            raise ValueError("draft-model: pass --draft NAME (the smaller model to distil)")
        if args.temperature <= 0:
            raise ValueError(f"draft-model: --temperature must be > 0, got {args.temperature}")
        if args.ce_weight < 0:
            raise ValueError(f"draft-model: --ce-weight must be >= 0, got {args.ce_weight}")
        if args.lora and (args.lora_rank < 1 or args.lora_alpha <= 0):
            raise ValueError(f"draft-model: --lora-rank must be >= 1 and --lora-alpha > 0, got "
                             f"{args.lora_rank}, {args.lora_alpha}")
        arguments.dtype(args.save_dtype, "draft-model: --save-dtype")
        self.args = args
        self._tokenizer = None

    def arguments(self) -> dict:
        return asdict(self.args)

    def _load_draft(self, target):
        draft, tokenizer = load_model(self.args.draft, dtype=torch.float32)  # trained in fp32
        if _vocab(draft) != _vocab(target):
            raise ValueError(
                f"draft-model: --draft {self.args.draft} has a {_vocab(draft)}-token vocabulary but the target has "
                f"{_vocab(target)}; distil a model that shares the target's tokenizer"
            )
        return draft.to(target.device), tokenizer

    def build(self, target, train: TrainArguments) -> nn.Module:
        draft, self._tokenizer = self._load_draft(target)
        if not self.args.lora:
            return draft
        peft = require("peft", "train")
        config = peft.LoraConfig(r=self.args.lora_rank, lora_alpha=self.args.lora_alpha, lora_dropout=0.0,
                            target_modules="all-linear", bias="none")
        return peft.get_peft_model(draft, config)

    def _logits(self, draft, target, batch: Batch, *, grad: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Draft and target logits [n, vocab] at the n labelled positions, their target tokens [n]."""
        mask = labelled(batch)
        cols = mask.any(0).nonzero().flatten()  # [c] positions labelled in some row: the lm_heads see only these
        ids, attention = batch.input_ids, batch.attention_mask
        with torch.no_grad():
            t_logits = target(input_ids=ids, attention_mask=attention, logits_to_keep=cols, use_cache=False).logits
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            d_logits = draft(input_ids=ids, attention_mask=attention, logits_to_keep=cols, use_cache=False).logits
        keep = mask[:, cols]  # [b, c]
        labels = F.pad(ids[:, 1:], (0, 1))[:, cols][keep]
        return d_logits[keep].float(), t_logits[keep].float(), labels, keep

    def loss(self, draft, target, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        d_logits, t_logits, labels, _ = self._logits(draft, target, batch)
        if not labels.numel():  # no answer token in the batch: a zero that still reaches every parameter
            return sum(p.sum() for p in draft.parameters() if p.requires_grad) * 0.0, {"kl": 0.0}
        temp = self.args.temperature
        kl = F.kl_div(torch.log_softmax(d_logits / temp, -1), torch.log_softmax(t_logits / temp, -1),
                      log_target=True, reduction="batchmean") * temp**2
        parts = {"kl": float(kl.detach())}
        loss = kl
        if self.args.ce_weight > 0:
            ce = F.cross_entropy(d_logits, labels)
            parts["ce"] = float(ce.detach())
            loss = kl + self.args.ce_weight * ce
        return loss, parts

    def evaluate(self, draft, target, batches: Iterator[Batch]) -> dict:
        before, _ = self._load_draft(target)  # the draft as it was: compared on the same held-out batches
        before.eval()
        sums = {"before": [0, 0.0], "after": [0, 0.0]}  # agreeing positions, summed KL
        positions = 0
        for batch in batches:
            for name, model in (("before", before), ("after", draft)):
                d_logits, t_logits, labels, _ = self._logits(model, target, batch, grad=False)
                sums[name][0] += int((d_logits.argmax(-1) == t_logits.argmax(-1)).sum())
                sums[name][1] += float(F.kl_div(torch.log_softmax(d_logits, -1), torch.log_softmax(t_logits, -1),
                                                log_target=True, reduction="sum"))
            positions += labels.numel()
        del before
        if not positions:  # nothing held out (--eval-fraction 0)
            return {"eval": {"positions": 0}}
        metrics = {"positions": positions}
        for name, (agree, kl) in sums.items():
            metrics[name] = {"top1": agree / positions, "kl": kl / positions}
        print(f"draft-model: held-out top-1 agreement with the target {metrics['before']['top1']:.3f} before, "
              f"{metrics['after']['top1']:.3f} after distillation, over {positions} positions", file=sys.stderr)
        return {"eval": metrics}

    def save(self, draft, target, directory: Path, metadata: dict) -> Path:
        if self.args.lora:
            draft = draft.merge_and_unload()  # an ordinary model again: LoRA folded into its weights
        draft = draft.to(dtype=arguments.dtype(self.args.save_dtype))
        tokenizer = self._tokenizer if self._tokenizer is not None else load_model(self.args.draft)[1]
        report = {"target": str(target.config.name_or_path), "draft": self.args.draft, **metadata}
        return _save_atomically(Path(directory), draft, tokenizer, report)


def _save_atomically(directory: Path, model, tokenizer, report: dict) -> Path:
    """`save_pretrained` into a temporary sibling, renamed into place; the old directory moves aside
    first, so the destination is always a whole model."""

    def fill(staged: Path) -> None:
        model.save_pretrained(staged)
        tokenizer.save_pretrained(staged)
        (staged / REPORT).write_text(json.dumps(report, indent=2) + "\n")

    return checkpoint.write_directory(directory, fill)
