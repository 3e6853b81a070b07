"""Medusa: K extra heads on the target's last hidden state guess the tokens 2..K+1 ahead.

``Context.hidden_states[-1]`` is the target's post-norm state at the token before the root, so
with that state at position p, head k (1-based) predicts position p + 1 + k, the depth-k node.
Each head is `num_layers` zero-initialised residual blocks ``x + SiLU(W x)`` and the target's
shared lm_head (or its own). The tree is a static shape (`specdec.trees.presets`) filled with
each head's top-k, scored by the product of head probabilities; with a measured accuracy table
it is calibrated and sized by the verify-cost curve. A Medusa-2 checkpoint carries a LoRA
adapter; `adapted_target` merges it into a copy of the model, and output is exact for that
adapted model, which the drafter requires.

Boundary: the core interface, `specdec.trees`, `specdec.memory` and this package's checkpoint
and draft-vocabulary helpers; `medusa_formats` reads vLLM's and FasterDecoding's layouts for it.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from specdec import memory
from specdec.drafter import Context, Feedback
from specdec.drafters import checkpoint
from specdec.drafters.vocab import DraftVocab, PackedDraft, stored, stripped
from specdec.extras import require
from specdec.trees import TokenTree, fill, parents_of
from specdec.trees.presets import calibrated, cut, preset, validate

KIND = "medusa"
DEFAULT_TREE = "medusa-16"  # without an accuracy table: Medusa's tree cut to a CPU-sized verify
DEFAULT_BUDGET = 32  # most nodes of a calibrated tree
LORA_PREFIX = "backbone_lora."  # a Medusa-2 checkpoint's decoder adapter tensors


class ResBlock(nn.Module):
    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        nn.init.zeros_(self.linear.weight)  # identity at start: the head begins as the target's lm_head
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        return x + F.silu(self.linear(x))


class MedusaHeads(nn.Module):
    """`num_heads` heads of `num_layers` residual blocks. ``vocab_size=None``: the heads project
    with the lm_head weight passed to `forward` (the target's); otherwise each head owns one."""

    def __init__(self, hidden_size: int, num_heads: int = 4, num_layers: int = 1, vocab_size: int | None = None):
        super().__init__()
        for name, value in (("hidden_size", hidden_size), ("num_heads", num_heads), ("num_layers", num_layers)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"MedusaHeads: {name} must be an int >= 1, got {value!r}")
        self.hidden_size, self.num_heads, self.num_layers = hidden_size, num_heads, num_layers
        self.vocab_size = vocab_size
        self.blocks = nn.ModuleList(
            nn.Sequential(*(ResBlock(hidden_size) for _ in range(num_layers))) for _ in range(num_heads)
        )
        self.lm_heads = None if vocab_size is None else nn.ModuleList(
            nn.Linear(hidden_size, vocab_size, bias=False) for _ in range(num_heads)
        )

    def config(self) -> dict:
        return {"hidden_size": self.hidden_size, "num_heads": self.num_heads, "num_layers": self.num_layers,
                "vocab_size": self.vocab_size}

    def init_lm_heads(self, weight: Tensor) -> None:
        """Start every own lm_head from the target's (Medusa's initialisation); no-op when shared."""
        if self.lm_heads is not None:
            with torch.no_grad():
                for head in self.lm_heads:
                    head.weight.copy_(weight)

    def features(self, hidden: Tensor, num_heads: int | None = None) -> Tensor:
        """[..., hidden] target states -> [..., num_heads, hidden] what the first `num_heads` heads
        (all by default) put through their lm_head."""
        n = self.num_heads if num_heads is None else num_heads
        x = hidden.to(self.blocks[0][0].linear.weight.dtype)
        return torch.stack([block(x) for block in self.blocks[:n]], dim=-2)

    def forward(self, hidden: Tensor, lm_weight: Tensor | None = None, lm_bias: Tensor | None = None,
                num_heads: int | None = None, vocab: DraftVocab | None = None) -> Tensor:
        """[..., hidden] target states -> [..., num_heads, vocab] logits of the first `num_heads`
        heads (all by default). `lm_weight` [vocab, hidden] / `lm_bias` are the target's lm_head,
        needed unless the heads own theirs or `vocab` is given: then the logits are over its
        columns (``vocab.tokens``), [..., num_heads, V' + c]."""
        feats = self.features(hidden, num_heads)  # [..., n, hidden]
        if self.lm_heads is not None:
            return torch.stack(
                [head(feats[..., i, :]) for i, head in enumerate(self.lm_heads[: feats.shape[-2]])], dim=-2
            )
        if vocab is not None:
            return vocab.logits(feats)
        if lm_weight is None:
            raise ValueError("MedusaHeads: pass the target's lm_head weight (the heads were built with "
                             "vocab_size=None)")
        return F.linear(feats.to(lm_weight.dtype), lm_weight, lm_bias)


def _split_lora(tensors: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """A checkpoint's tensors -> (the Medusa-2 decoder adapter, prefix removed; the heads')."""
    lora = {k[len(LORA_PREFIX):]: v for k, v in tensors.items() if k.startswith(LORA_PREFIX)}
    return lora, {k: v for k, v in tensors.items() if not k.startswith(LORA_PREFIX)}


def lora_config(backbone: dict):
    """The peft `LoraConfig` a Medusa-2 checkpoint's metadata["backbone"]["lora"] describes."""
    return require("peft", "train").LoraConfig(**backbone["lora"], lora_dropout=0.0, bias="none")


def adapted_target(directory, model):
    """Medusa-2: a copy of `model` with the checkpoint's jointly trained LoRA merged into its
    decoder, the target those heads read (`model` itself is left untouched)."""
    peft = require("peft", "train")
    ckpt = checkpoint.load(directory, KIND, model)
    backbone = ckpt.metadata.get("backbone")
    if not backbone:
        raise checkpoint.CheckpointError(f"drafter checkpoint {str(directory)!r} holds Medusa-1 heads (trained on the "
                                         "unchanged target): use the model itself as the target")
    lora, _ = _split_lora(ckpt.tensors)
    if model.device.type == "cpu":
        memory.require(sum(p.numel() * p.element_size() for p in model.parameters()),
                       "adapted_target: a copy of the target to merge the adapter into",
                       "free memory, or use Medusa-1 heads, which read the target itself")
    adapted = copy.deepcopy(model)
    decoder = peft.get_peft_model(adapted.get_decoder(), lora_config(backbone))  # injects into the copy's decoder
    unexpected = peft.set_peft_model_state_dict(
        decoder, {k: v.to(model.dtype) for k, v in lora.items()}
    ).unexpected_keys
    if unexpected or not lora:
        raise checkpoint.CheckpointError(f"drafter checkpoint {str(directory)!r} is corrupt: its adapter tensors "
                                         f"({sorted(unexpected)[:3] or 'none'}) do not fit the model")
    decoder.merge_and_unload()  # in place: the copy's decoder layers get the merged weights back as plain Linear
    if not checkpoint.same_fingerprint(checkpoint.fingerprint(adapted), backbone["fingerprint"]):
        raise checkpoint.CheckpointError(f"drafter checkpoint {str(directory)!r}: merging its adapter into this model "
                                         "does not give the decoder it was trained with; load it with the model it "
                                         "was trained for")
    return adapted


def lm_head_of(model) -> tuple[Tensor, Tensor | None]:
    """The target's output projection as frozen tensors sharing its storage (no copy, no grad)."""
    head = model.get_output_embeddings()
    bias = getattr(head, "bias", None)
    return head.weight.detach(), None if bias is None else bias.detach()


class Medusa:
    needs_hidden_states = True

    def __init__(
        self, model, heads: MedusaHeads, *, tree: str | Sequence[Sequence[int]] | None = None,
        budget: int | None = None, accuracy: Tensor | Sequence[Sequence[float]] | None = None,
        metadata: dict | None = None, backbone_lora: dict[str, Tensor] | None = None,
        draft_vocab: Tensor | None = None,
    ):
        """`tree`: a preset name (`specdec.trees.presets.PRESETS`), a list of rank paths, or None:
        calibrated from `accuracy` when given (re-sized each generation from the target's
        verify-cost curve), else the "medusa-16" preset. Presets deeper than the heads reach
        are cut to their depth. `budget`: most tree nodes (a preset or path list keeps its
        first `budget` paths, which always form a tree; a calibrated tree defaults to 32).
        `accuracy`: [num_heads, ranks] measured chance that head d's rank-r token is right
        given the heads before it were (training writes it into the checkpoint). `metadata`:
        the checkpoint's training record, saved again by `save_pretrained`. `backbone_lora`: a
        Medusa-2 checkpoint's decoder adapter (peft state dict), kept to be saved again; its
        metadata["backbone"] names the adapted target, and `model` must be that target.
        `draft_vocab`: [V] token ids whose lm_head rows the heads score, with each request's
        context tokens added (`specdec.drafters.vocab`; heads sharing the target's lm_head only);
        None: every row. `from_pretrained` passes the checkpoint's, if it has one."""
        if not isinstance(heads, MedusaHeads):
            raise TypeError(f"Medusa: heads must be a MedusaHeads, got {type(heads).__name__}")
        if budget is not None and (not isinstance(budget, int) or budget < 1):
            raise ValueError(f"Medusa: budget must be an int >= 1 or None, got {budget!r}")
        self.model, self.heads, self.budget = model, heads, budget
        self.metadata = dict(metadata or {})
        self.backbone_lora = dict(backbone_lora or {})
        if self.backbone_lora and "backbone" not in self.metadata:
            raise ValueError("Medusa: backbone_lora needs metadata['backbone'] (its LoRA config and the adapted "
                             "decoder's fingerprint), as `specdec train medusa --joint` writes it")
        self._checked = None  # the target last validated (the fingerprint costs a pass over the weights)
        self._check(model)
        self.accuracy = None
        if accuracy is not None:
            self.accuracy = torch.as_tensor(accuracy, dtype=torch.float64)
            if self.accuracy.dim() != 2 or self.accuracy.shape[0] > heads.num_heads:
                raise ValueError(f"Medusa: accuracy must be [depth <= num_heads={heads.num_heads}, ranks], "
                                 f"got shape {tuple(self.accuracy.shape)}")
            calibrated(self.accuracy, 1)  # raises now, not mid-generation, for chances outside [0, 1]
            self.metadata["accuracy"] = self.accuracy.tolist()
        if tree is None and self.accuracy is None:
            tree = DEFAULT_TREE
        if tree is None:
            self.paths = None  # calibrated per cost curve in `shape`
        elif isinstance(tree, str):
            self.paths = cut(preset(tree), heads.num_heads)[:budget]
        else:
            self.paths = validate(tree, max_depth=heads.num_heads)[:budget]
        self._calibrated: tuple[object, list] | None = None  # (verify_cost it was sized for, paths)
        if draft_vocab is not None and heads.lm_heads is not None:
            raise ValueError("Medusa: a draft vocabulary picks rows of the target's lm_head, but these heads own their "
                             "lm_heads (trained with --own-lm-head); use them without one")
        self._vocab = DraftVocab(*lm_head_of(model), draft_vocab, "Medusa")
        self._vocab_of = model  # the target whose lm_head rows `_vocab` holds
        self._route = PackedDraft(heads, self._vocab, None)  # each proposal takes the runtime's (`Context.packing`)

    @property
    def draft_vocab(self) -> Tensor | None:
        """[V] sorted token ids of the draft vocabulary, or None: every row."""
        return self._vocab.ids

    def _check(self, target) -> None:
        vocab = target.get_output_embeddings().out_features
        if target.config.hidden_size != self.heads.hidden_size:
            raise ValueError(f"Medusa: the heads take hidden size {self.heads.hidden_size} but the target's is "
                             f"{target.config.hidden_size}; use heads trained for this target")
        if self.heads.vocab_size is not None and self.heads.vocab_size != vocab:
            raise ValueError(f"Medusa: the heads' own lm_heads have {self.heads.vocab_size} tokens but the target's "
                             f"vocabulary has {vocab}; use heads trained for this target")
        backbone = self.metadata.get("backbone")
        if backbone and target is not self._checked:
            if not checkpoint.same_fingerprint(checkpoint.fingerprint(target), backbone["fingerprint"]):
                raise checkpoint.CheckpointError(
                    "Medusa: these heads were trained jointly with LoRA adapters on the target's decoder (Medusa-2), "
                    "and this target is not the adapted one; pass "
                    "`specdec.drafters.medusa.adapted_target(checkpoint_dir, "
                    "model)` as the target (its outputs are exactly the adapted model's)")
            self._checked = target

    # ---- checkpoints -----------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, directory, model, *, check_base_model: bool = True, **kwargs) -> Medusa:
        """Heads saved by `save_pretrained` (or `specdec train medusa`), or in vLLM's or
        FasterDecoding's layout (`specdec.drafters.medusa_formats`), validated against `model`;
        the saved accuracy table calibrates the tree unless `tree=` is given."""
        from specdec.drafters import medusa_formats  # it builds on this module

        if medusa_formats.layout(directory):
            ckpt, vocab = medusa_formats.read(directory, model, check_base_model=check_base_model)
        else:
            ckpt = checkpoint.load(directory, KIND, model, check_base_model=check_base_model)
            ckpt, vocab = stripped(ckpt, directory, model.get_output_embeddings().out_features)
        lora, rest = _split_lora(ckpt.tensors)
        heads = checkpoint.instantiate(dataclasses.replace(ckpt, tensors=rest), MedusaHeads, directory)
        heads.to(device=model.device, dtype=model.dtype)
        kwargs.setdefault("accuracy", ckpt.metadata.get("accuracy"))
        kwargs.setdefault("draft_vocab", vocab)  # an explicit draft_vocab (None: every row) wins
        return cls(model, heads, metadata=ckpt.metadata, backbone_lora=lora, **kwargs)

    @classmethod
    def shipped(cls, model, **kwargs) -> Medusa:
        """The heads shipped with specdec for this model (`checkpoint.shipped`), or a clear error."""
        return cls.from_pretrained(checkpoint.shipped(KIND, model), model, **kwargs)

    def save_pretrained(self, directory) -> Path:
        tensors = {**self.heads.state_dict(), **{LORA_PREFIX + k: v for k, v in self.backbone_lora.items()}}
        config, tensors = stored(self.heads.config(), tensors, self.draft_vocab)
        return checkpoint.save(directory, checkpoint.Checkpoint(
            KIND, checkpoint.describe(self.model), config, tensors, self.metadata))

    # ---- drafting --------------------------------------------------------------------------
    def shape(self, verify_cost: Callable[[int], float] | None = None) -> list[tuple[int, ...]]:
        """The tree shape used under this verify-cost curve."""
        if self.paths is not None:
            return self.paths
        if self._calibrated is None or self._calibrated[0] is not verify_cost:
            paths = calibrated(self.accuracy, self.budget or DEFAULT_BUDGET, verify_cost)
            self._calibrated = (verify_cost, paths)
        return self._calibrated[1]

    def begin(self, target) -> None:
        self._check(target)
        if target is not self._vocab_of:  # refused before anything changes
            self._vocab, self._vocab_of = DraftVocab(*lm_head_of(target), self.draft_vocab, "Medusa"), target
        self._vocab.reset()  # the last request's context tokens leave the draft vocabulary

    @torch.no_grad()
    def propose(self, ctx: Context) -> TokenTree:
        hidden = ctx.hidden_states
        if hidden is None or hidden.shape[0] == 0:  # a one-token prompt has no state before the root
            return TokenTree.empty()
        paths = self.shape(ctx.verify_cost)
        if ctx.max_depth is not None:
            paths = cut(paths, ctx.max_depth)
        if not paths:
            return TokenTree.empty()
        self._vocab.admit(ctx.input_ids)
        depth = max(len(p) for p in paths)
        # Head forwards over at least the target's crossover rows (one per head) run packed.
        self._route = self._route.rebuilt(self.heads, self._vocab, ctx.packing.packed_from(self._vocab_of))
        with self._route(depth):
            # [depth, V' + c] (own heads: vocab)
            logits = self.heads(hidden[-1:], num_heads=depth, vocab=self._vocab)[0]
        if 1 + max(max(p) for p in paths) > logits.shape[-1]:  # a draft vocabulary smaller than the tree's ranks
            paths = [p for p in paths if max(p) < logits.shape[-1]]  # prefix-closed: a prefix's ranks are its path's
        topk = 1 + max(max(p) for p in paths)
        probs, columns = torch.softmax(logits.float(), dim=-1).topk(topk, dim=-1)  # [depth, topk]
        probs, columns = probs.double().cpu().tolist(), columns.cpu()  # the proposal's one wait for the device
        tokens = self._vocab.token_ids(columns)  # own heads have no draft vocabulary: columns are ids
        scores: list[float] = []
        for path, parent in zip(paths, parents_of(paths)):
            scores.append(probs[len(path) - 1][path[-1]] * (scores[parent] if parent >= 0 else 1.0))
        tree = fill(paths, tokens)
        return TokenTree(tree.tokens, tree.parents, scores=torch.tensor(scores, dtype=torch.float64))

    def update(self, feedback: Feedback) -> None:
        pass  # stateless: every proposal comes from ctx.hidden_states
