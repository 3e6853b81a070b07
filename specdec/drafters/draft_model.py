"""A smaller causal LM sharing the target's vocabulary drafts a chain or a dynamic top-k tree.

The draft model keeps its own KV cache, reconciled against the committed tokens by common prefix
before each proposal, and grows trees with `specdec.trees.expand` (both in
`specdec.drafters.cached_drafting`, shared with the self-speculative drafters).
"""

from __future__ import annotations

import torch
from torch import Tensor

from specdec import kv
from specdec.drafter import Context, Feedback
from specdec.drafters import cached_drafting
from specdec.packing import PackedRoute
from specdec.trees import TokenTree


def _vocab_size(model) -> int:
    return model.get_output_embeddings().out_features  # also on quantized linears (their `weight` is a method)


def check_options(who: str, num_tokens: int, topk: int, window: int | None, min_confidence: float) -> None:
    """The draft options `DraftModel` takes, checked with `who` named in the error."""
    cached_drafting.check_window(who, window)
    if not 0 <= min_confidence < 1:
        raise ValueError(f"{who}: min_confidence must be in [0, 1), got {min_confidence}")
    if num_tokens < 1 or topk < 1:
        raise ValueError(f"{who}: num_tokens and topk must be >= 1, got {num_tokens}, {topk}")


class DraftModel:
    needs_hidden_states = False

    def __init__(
        self, model, *, num_tokens: int = 5, topk: int = 1, width: int | None = None, budget: int | None = None,
        window: int | None = None, min_confidence: float = 0.0,
    ):
        """`num_tokens`: draft depth. ``topk = 1`` drafts a greedy chain; ``topk > 1`` grows a tree
        whose every level keeps the `width` (default `topk`) best nodes by cumulative draft
        probability, cut to the `budget` best nodes overall (the draft model's own forwards run
        packed as `Context.packing` routes them, by its own crossover). `min_confidence`: stop
        drafting deeper once the draft model's best next token is less likely than this (0: always
        draft `num_tokens`; HF assisted generation's default cut-off is 0.4).
        `window`: when the draft (re)starts on more than this many committed tokens (a long
        prompt, a new turn), it reads only the last `window` of them (None: all)."""
        check_options("DraftModel", num_tokens, topk, window, min_confidence)
        self.model = model.eval()
        self.num_tokens, self.topk = num_tokens, topk
        self.width = 1 if topk == 1 else (width or topk)
        self.budget = budget
        self.window = window
        self.min_confidence = min_confidence
        self._route = PackedRoute(model, None)
        self.cache = kv.new_cache(model)
        self.cached = torch.zeros(0, dtype=torch.long)  # [c] the tokens whose keys/values are in self.cache
        self.start = 0  # the position of self.cached[0]

    def begin(self, target) -> None:
        if _vocab_size(target) != _vocab_size(self.model):
            raise ValueError(
                f"DraftModel: the draft model's vocabulary ({_vocab_size(self.model)} tokens) differs from the "
                f"target's ({_vocab_size(target)}); pick a draft model with the target's tokenizer"
            )
        # The draft cache stays: propose keeps its common prefix with the new prompt, so the
        # next turn of a conversation does not prefill the draft model from scratch.

    def _forward(self, ids: Tensor, positions: Tensor, mask: Tensor | None, last_only: bool = False) -> Tensor:
        device = self.model.device
        with self._route(ids.numel()):
            out = self.model(
                input_ids=ids[None].to(device),
                position_ids=positions[None].to(device),
                attention_mask=None if mask is None else mask.to(device),
                **kv.cache_kwargs(self.model, self.cache),
                use_cache=True,
                logits_to_keep=1 if last_only else 0,  # the lm_head is a large share of a small model's weights
            )
        return torch.log_softmax(out.logits[0].float(), dim=-1)  # [m, vocab] on the model's device

    @torch.no_grad()
    def propose(self, ctx: Context) -> TokenTree:
        self._route = ctx.packing.route(self.model)  # the runtime decides which forwards run packed
        ids = ctx.input_ids
        depth = self.num_tokens if ctx.max_depth is None else min(self.num_tokens, ctx.max_depth)
        if depth < 1:
            return TokenTree.empty()
        tree, self.cached, self.start = cached_drafting.draft(
            self._forward, self.cache, self.cached, ids, depth=depth, topk=self.topk, width=self.width,
            budget=self.budget, min_confidence=self.min_confidence, dtype=self.model.dtype,
            start=self.start, window=self.window,
        )
        return tree

    def update(self, feedback: Feedback) -> None:
        pass  # the cache is reconciled lazily in propose
