"""``specdec train draft-vocab``: give a trained head-based drafter (Eagle, Medusa) a draft
vocabulary after the fact, the N tokens the target generated most often in make-data answers
(EAGLE-3's reduced vocabulary; `specdec.drafters.vocab`). `pick_draft_vocab` is also how
``specdec train eagle --draft-vocab-size`` picks the vocabulary it trains over.

Boundary: training layer; loads the drafters named in `DRAFTERS` and the data module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor

from specdec.drafters import checkpoint
from specdec.training import arguments
from specdec.training.data import frequent_answer_tokens, load_examples

DRAFTERS = ("eagle", "medusa")  # checkpoint kinds whose drafters score lm_head rows


@dataclass
class DraftVocabArguments:
    model: str = field(metadata={"help": "the target the drafter was trained for: embedded name, HF path/id or .gguf "
                                         "file"})
    drafter: str = field(metadata={"help": "an Eagle or Medusa checkpoint directory (specdec train eagle/medusa's "
                                           "output_dir/drafter)"})
    data: str = field(metadata={"help": "make-data output of the same target (several joined by commas): its answers "
                                        "are counted"})
    size: int = field(default=8192, metadata={"help": "keep the N most frequent answer tokens of the drafter's "
                                                      "training "
                                                      "split (its held-out split measures their coverage)"})
    output_dir: str | None = field(default=None, metadata={"help": "where to save (default: replace --drafter "
                                                                   "atomically)"})


def pick_draft_vocab(data: str, size: int, vocab_size: int, *, eval_fraction: float, seed: int) -> tuple[Tensor, dict]:
    """([V'] sorted token ids: the `size` answer tokens the target generated most often in the
    training split of `data`, the order a `DraftVocab` keeps its rows in; the record saved with them)."""
    vocab, coverage = frequent_answer_tokens(data, size, vocab_size, eval_fraction=eval_fraction, seed=seed)
    vocab = vocab.sort().values
    return vocab, {"size": vocab.numel(), "data": str(data), "held_out_coverage": coverage,
                   "eval_fraction": eval_fraction, "seed": seed}


def add_draft_vocab(args: DraftVocabArguments, command: str | None = None) -> Path:
    """Save the --drafter again with a draft vocabulary: the --size tokens the target generated
    most often in --data. Drafts then score those lm_head rows (and each context's tokens) only."""
    from specdec.drafters import TRAINED
    from specdec.drafters.medusa import adapted_target
    from specdec.models import load_model

    if args.size < 1:
        raise ValueError(f"draft-vocab: --size must be >= 1, got {args.size}")
    if args.output_dir is not None:
        arguments.output_dir(args.output_dir)
    header = checkpoint.header_of(args.drafter)
    kind, metadata = header["drafter"], header.get("metadata", {})
    if kind not in DRAFTERS:
        raise ValueError(f"draft-vocab: {args.drafter} holds a {kind!r} drafter; only {', '.join(DRAFTERS)} drafters "
                         "score lm_head rows")
    load_examples(args.data)  # refuses missing data before the model loads
    target = load_model(args.model)[0]
    if metadata.get("backbone"):
        target = adapted_target(args.drafter, target)  # Medusa-2 heads read the LoRA-adapted decoder
    training = metadata.get("training", {}).get("arguments", {})  # the drafter's own train/held-out split
    if training.get("draft_vocab_size"):
        raise ValueError(f"{args.drafter} was trained over its own draft vocabulary (--draft-vocab-size "
                         f"{training['draft_vocab_size']}); another one would score rows it never learnt to rank: "
                         "train with the --draft-vocab-size you want instead")
    vocab, record = pick_draft_vocab(args.data, args.size, target.get_output_embeddings().weight.shape[0],
                                     eval_fraction=training.get("eval_fraction", 0.05), seed=training.get("seed", 0))
    drafter = TRAINED[kind].from_pretrained(args.drafter, target, draft_vocab=vocab)
    drafter.metadata.pop("shipped_dtype", None)  # saved in the target's dtype now
    drafter.metadata["draft_vocab"] = {**record, "command": command}
    return drafter.save_pretrained(args.output_dir or args.drafter)
