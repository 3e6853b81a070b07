"""A smaller causal LM sharing the target's vocabulary drafts a chain or a dynamic top-k tree;
`QuantizedDraft` drafts with a dynamic int8 copy of the target itself the same way.

The draft model keeps its own KV cache, reconciled against the committed tokens by common prefix
before each proposal, and grows trees with `specdec.trees.expand` (both in
`specdec.drafters.cached_drafting`, shared with the self-speculative drafters). Draft depth is
sized by `specdec.trees.best_size` from the running acceptance and the draft forward's measured
cost relative to the target's (`Context.forward_s`).
"""

from __future__ import annotations

import dataclasses
import functools
import weakref

import torch
from torch import Tensor

from specdec import devices, kv
from specdec.drafter import Context, Feedback
from specdec.drafters import cached_drafting
from specdec.drafters.prompt_lookup import PromptLookup
from specdec.drafters.quantized import check_scheme, check_target, model_bytes, quantized_copy
from specdec.packing import PackedRoute
from specdec.trees import RunningRate, TokenTree, best_size


def _vocab_size(model) -> int:
    return model.get_output_embeddings().out_features  # also on quantized linears (their `weight` is a method)


def check_options(
    who: str, num_tokens: int, topk: int, window: int | None, min_confidence: float, lookup: int
) -> None:
    """The draft options `DraftModel` takes, checked with `who` named in the error."""
    cached_drafting.check_window(who, window)
    if lookup < 0:
        raise ValueError(f"{who}: lookup must be >= 0 (guessed tokens per draft forward; 0: off), got {lookup}")
    if lookup and topk != 1:
        raise ValueError(f"{who}: lookup (multi-level drafting) speeds up a chain only: use topk=1 or lookup=0")
    if not 0 <= min_confidence < 1:
        raise ValueError(f"{who}: min_confidence must be in [0, 1), got {min_confidence}")
    if num_tokens < 1 or topk < 1:
        raise ValueError(f"{who}: num_tokens and topk must be >= 1, got {num_tokens}, {topk}")


_COSTED = 32  # draft forwards over at most this many tokens are timed for the per-token draft cost


class DraftModel:
    needs_hidden_states = False

    def __init__(
        self, model, *, num_tokens: int = 5, topk: int = 1, width: int | None = None, budget: int | None = None,
        window: int | None = None, min_confidence: float = 0.0, sized: bool = True, quantize: str | None = None,
        calibration: Tensor | None = None, lookup: int = 0,
    ):
        """`num_tokens`: the deepest draft; with `sized` each proposal drafts the depth that
        maximises expected tokens per unit of time (`best_size` over the running acceptance, with
        ``draft_cost`` = this model's measured forward time over the target's), else always
        `num_tokens`. `quantize`: a `specdec.drafters.quantized.SCHEMES` key drafts with a dynamic
        int8 copy of `model` (`quantized_copy`, `calibration` its token ids; the fp32 `model` is
        not kept). ``topk = 1`` drafts a greedy chain; ``topk > 1`` grows a tree
        whose every level keeps the `width` (default `topk`) best nodes by cumulative draft
        probability, cut to the `budget` best nodes overall (the draft model's own forwards run
        packed as `Context.packing` routes them, by its own crossover). `min_confidence`: stop
        drafting deeper once the draft model's best next token is less likely than this (0: always
        draft `num_tokens`; HF assisted generation's default cut-off is 0.4).
        `window`: when the draft (re)starts on more than this many committed tokens (a long
        prompt, a new turn), it reads only the last `window` of them (None: all). `lookup`
        (multi-level drafting, chains only): each draft forward also feeds up to `lookup` tokens
        that n-gram lookup over the context and chain expects next (`PromptLookup`), and the draft
        model confirms the ones it would draft itself in that forward (0: off)."""
        check_options("DraftModel", num_tokens, topk, window, min_confidence, lookup)
        if quantize is not None:
            check_scheme(quantize, "DraftModel")
            model = quantized_copy(model, quantize, calibration=calibration)
        self.model = model.eval()
        self.sized = sized
        self._accept = RunningRate(1.0, 2.0)  # accepted draft tokens per trial (prior 0.5, decay 0.95)
        self._forward_s = RunningRate(0.0, 1e-9, decay=0.9)  # draft seconds per drafted level (no prefill)
        self._spent = 0.0  # this proposal's draft seconds; NaN once a (re)start's prefill ran
        self._drafted = 0  # depth of the last proposal (0: none to learn from)
        self.num_tokens, self.topk = num_tokens, topk
        self.width = 1 if topk == 1 else (width or topk)
        self.budget = budget
        self.window = window
        self.min_confidence = min_confidence
        self._guesser = PromptLookup(num_tokens=lookup) if lookup else None
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

    @functools.cached_property
    def memory_bytes(self) -> int:
        """Bytes of the draft model's weights and buffers (packed int8 ones included)."""
        return model_bytes(self.model)

    def _depth(self, ctx: Context, most: int) -> int:
        """The draft depth for this proposal: `most`, or sized by cost (see `__init__`)."""
        if not self.sized or ctx.forward_s is None or self._forward_s.hits == 0:
            return most  # nothing measured yet: the first proposal measures
        a = self._accept.rate
        draft_cost = self._forward_s.rate / ctx.forward_s
        depth = best_size([a**k for k in range(1, most + 1)], ctx.verify_cost, draft_cost=draft_cost).n
        if depth == 0:  # not worth drafting now; drift back to the prior so it is re-probed later
            self._accept.relax()
        return depth

    def _forward(self, ids: Tensor, positions: Tensor, mask: Tensor | None, last_only: bool = False) -> Tensor:
        device = self.model.device
        t0 = devices.clock(device)
        with self._route(ids.numel()):
            out = self.model(
                input_ids=ids[None].to(device),
                position_ids=positions[None].to(device),
                attention_mask=None if mask is None else mask.to(device),
                **kv.cache_kwargs(self.model, self.cache),
                use_cache=True,
                logits_to_keep=1 if last_only else 0,  # the lm_head is a large share of a small model's weights
            )
        logprobs = torch.log_softmax(out.logits[0].float(), dim=-1)  # [m, vocab] on the model's device
        # a (re)start's prefill is paid once, not per drafted token: such a proposal is not costed
        self._spent += devices.clock(device) - t0 if ids.numel() <= _COSTED else float("nan")
        return logprobs

    def _guess(self, seq: Tensor) -> Tensor:
        """[g <= lookup] tokens n-gram lookup expects after `seq` ([s]), for multi-level drafting."""
        found = self._guesser.continuations(seq.numpy(), self._guesser.num_tokens)
        return torch.from_numpy(found[0][1]) if found else torch.zeros(0, dtype=torch.long)

    @torch.no_grad()
    def propose(self, ctx: Context) -> TokenTree:
        self._route = ctx.packing.route(self.model)  # the runtime decides which forwards run packed
        ids = ctx.input_ids
        self._drafted = 0
        depth = self.num_tokens if ctx.max_depth is None else min(self.num_tokens, ctx.max_depth)
        depth = self._depth(ctx, depth) if depth >= 1 else 0
        if depth < 1:
            return TokenTree.empty()
        self._spent = 0.0
        tree, self.cached, self.start = cached_drafting.draft(
            self._forward, self.cache, self.cached, ids, depth=depth, topk=self.topk, width=self.width,
            budget=self.budget, min_confidence=self.min_confidence, dtype=self.model.dtype,
            start=self.start, window=self.window, guess=self._guess if self._guesser else None,
        )
        self._drafted = int(tree.depths().max()) if len(tree) else 0  # levels, one forward each without lookup
        if self._drafted and self._spent == self._spent:  # not NaN: no prefill among this proposal's forwards
            self._forward_s.add(self._spent, self._drafted)
        if self.width == 1 and len(tree):  # a chain's cumulative q is no acceptance chance; a ** depth is
            tree = dataclasses.replace(tree, scores=self._accept.rate ** tree.depths().double())
        return tree

    def update(self, feedback: Feedback) -> None:
        """Learn the acceptance rate (the cache is reconciled lazily in propose)."""
        drafted, self._drafted = self._drafted, 0
        if not drafted or not len(feedback.tree):  # nothing drafted, or a composition verified another's
            return
        drafted = min(drafted, int(feedback.tree.depths().max()))  # a merge budget may have cut it
        accepted = len(feedback.accepted_nodes)
        self._accept.add(accepted, accepted + (1 if accepted < drafted else 0))


class QuantizedDraft:
    """Drafts with a dynamic int8 copy of the target (`quantized_copy`), as `DraftModel` does with a
    separate draft model (same options, chain/tree drafting, sizing and cache reconciliation). The
    copy is built once per target and kept while that target lives: in `begin`, or for
    ``int8-smooth`` without `calibration` at the first proposal, calibrated on its committed
    tokens. `copy` is the current target's copy, `memory_bytes` what it adds to the target's."""

    needs_hidden_states = False

    def __init__(
        self, scheme: str = "int8-smooth", *, lm_head: bool = True, calibration: Tensor | None = None,
        num_tokens: int = 8, topk: int = 1, width: int | None = None, budget: int | None = None,
        window: int | None = None, min_confidence: float = 0.0, sized: bool = True, lookup: int = 0,
    ):
        """`scheme`: a key of `SCHEMES`; `lm_head`: quantize the output projection too (False keeps
        it fp32, shared with the target: slower on large vocabularies); `calibration`: token ids for
        ``int8-smooth`` (None: the first proposal's). The rest are `DraftModel`'s."""
        check_scheme(scheme)
        check_options("QuantizedDraft", num_tokens, topk, window, min_confidence, lookup)
        self.scheme, self.lm_head, self.calibration = scheme, lm_head, calibration
        self._options = dict(num_tokens=num_tokens, topk=topk, width=width, budget=budget, window=window,
                             min_confidence=min_confidence, sized=sized, lookup=lookup)
        self._drafts: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # target -> DraftModel
        self._target = None
        self._draft: DraftModel | None = None

    def __repr__(self) -> str:
        return f"QuantizedDraft({self.scheme!r}, lm_head={self.lm_head}, num_tokens={self._options['num_tokens']})"

    @property
    def copy(self):
        """The current target's int8 copy (built by `begin`, or by the first proposal for ``int8-smooth``)."""
        if self._draft is None:
            raise RuntimeError("QuantizedDraft: no copy yet; begin(target) builds it (the first proposal for "
                               "int8-smooth without calibration); generate calls both")
        return self._draft.model

    @property
    def memory_bytes(self) -> int:
        """Bytes of the current target's copy beyond the target's own tensors (0 before it is built)."""
        return 0 if self._draft is None else self._draft.memory_bytes

    def _build(self, target, calibration: Tensor | None) -> DraftModel:
        copied = quantized_copy(target, self.scheme, self.lm_head, calibration=calibration)
        self._drafts[target] = draft = DraftModel(copied, **self._options)
        draft.memory_bytes = model_bytes(copied, shared_with=target)  # the copy shares the target's other tensors
        return draft

    def begin(self, target) -> None:
        check_target(target, self.scheme)  # refuses before any generation
        self._target, self._draft = target, self._drafts.get(target)
        if self._draft is None and (self.scheme != "int8-smooth" or self.calibration is not None):
            self._draft = self._build(target, self.calibration)
        if self._draft is not None:
            self._draft.begin(target)

    def propose(self, ctx: Context) -> TokenTree:
        if self._target is None:
            raise RuntimeError("QuantizedDraft: propose before begin(target); generate calls begin first")
        if self._draft is None:  # int8-smooth: calibrated on what this call has committed
            self._draft = self._build(self._target, ctx.input_ids)
        return self._draft.propose(ctx)

    def update(self, feedback: Feedback) -> None:
        if self._target is None:
            raise RuntimeError("QuantizedDraft: update before begin(target); generate calls begin first")
        if self._draft is not None:
            self._draft.update(feedback)
