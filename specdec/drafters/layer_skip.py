"""Self-speculative drafting with the target minus some middle layers (SWIFT, Xia et al. 2024).

The draft is the target through a `LayerSubset` that leaves out a skip set (no training, no
copied weights) with its own KV cache for the kept layers (`cached_drafting`): a greedy chain or,
with ``topk > 1``, a dynamic tree, stopping below `min_confidence`. Unless ``skip=[...]`` fixes
it, the skip set is calibrated on the first proposal (and after `recalibrate()`), teacher-forced
over the last `calibrate_tokens` committed tokens: middle layers ranked by block influence
``1 - cos(input, output)`` (ShortGPT), the k least influential skipped for several k, then
random swaps; a set scores ``max_d (1 + a + ... + a^d) / (verify(d) + d * c)`` (agreement `a`,
weight cost `c`). Cost: one full forward plus `calibrate_trials` partial ones, once.

Boundary: the core interface, `specdec.trees`, `LayerSubset` and `cached_drafting`; never the
verifier's cache.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from specdec.drafter import Context, Feedback
from specdec.drafters import cached_drafting, layer_view
from specdec.packing import PackedRoute
from specdec.trees import DEFAULT_VERIFY_COST, TokenTree


@dataclass(frozen=True)
class Calibration:
    skip: tuple[int, ...]  # the chosen layers to skip
    agreement: float  # its teacher-forced next-token agreement with the target on the window
    value: float  # its expected speed over plain decoding, by the module docstring's cost model
    window: int  # tokens it was measured on
    # Every candidate tried, in order: (skip set, agreement, value).
    tried: list[tuple[tuple[int, ...], float, float]] = field(default_factory=list, repr=False)


class LayerSkip:
    needs_hidden_states = False

    def __init__(
        self,
        model,
        *,
        skip=None,
        draft_tokens: int = 6,
        topk: int = 1,
        width: int | None = None,
        budget: int | None = None,
        min_confidence: float = 0.5,
        calibrate_tokens: int = 64,
        calibrate_trials: int = 8,
        max_skip_ratio: float = 0.6,
        window: int | None = 256,
        seed: int = 0,
    ):
        """`model`: the target (the drafter runs part of it; `begin` refuses any other model).
        `skip`: decoder-layer indices to leave out; None chooses them by calibration (see the
        module docstring). `draft_tokens`: draft depth. ``topk = 1`` drafts a greedy chain;
        ``topk > 1`` a tree whose levels keep the `width` best nodes, cut to `budget` nodes.
        `min_confidence`: stop drafting deeper once the best next token is less likely than this
        (0: always `draft_tokens`). `calibrate_tokens`: the calibration window (the most recent
        committed tokens). `calibrate_trials`: candidate skip sets scored per calibration.
        `max_skip_ratio`: most of the middle layers the search may skip. `seed`: the search's random swaps.
        `window`: when the draft (re)starts on more than this many committed tokens (a long
        prompt, a new turn), it reads only the last `window` of them (None: all);
        the view's prefill costs most of a target forward."""
        cached_drafting.check_window("LayerSkip", window)
        if draft_tokens < 1 or topk < 1:
            raise ValueError(f"LayerSkip: draft_tokens and topk must be >= 1, got {draft_tokens}, {topk}")
        if not 0 <= min_confidence < 1:
            raise ValueError(
                f"LayerSkip: min_confidence must be in [0, 1) (0 = always draft draft_tokens), got {min_confidence}"
            )
        if calibrate_tokens < layer_view.MIN_WINDOW:
            raise ValueError(f"LayerSkip: calibrate_tokens must be >= {layer_view.MIN_WINDOW}, got {calibrate_tokens}")
        if calibrate_trials < 1:
            raise ValueError(f"LayerSkip: calibrate_trials must be >= 1, got {calibrate_trials}")
        if not 0 < max_skip_ratio < 1:
            raise ValueError(f"LayerSkip: max_skip_ratio must be in (0, 1), got {max_skip_ratio}")
        layer_view.check_faithful(model)
        self.model = model
        self.num_layers = layer_view.LayerSubset(model, []).num_layers
        self.draft_tokens, self.topk = draft_tokens, topk
        self.width = 1 if topk == 1 else (width or topk)
        self.budget = budget
        self.min_confidence = min_confidence
        self.calibrate_tokens, self.calibrate_trials = calibrate_tokens, calibrate_trials
        self.max_skip_ratio = max_skip_ratio
        self.window = window
        self.seed = seed
        self.calibration: Calibration | None = None
        self._route = PackedRoute(model, None)
        self.skip: tuple[int, ...] | None = None  # None until calibrated
        self._install(None if skip is None else self._checked_skip(skip))

    # ---- skip set ---------------------------------------------------------------------------
    def _checked_skip(self, skip) -> tuple[int, ...]:
        skip = sorted(set(int(i) for i in skip))
        n = self.num_layers
        if any(not 0 <= i < n for i in skip) or len(skip) == n:
            raise ValueError(
                f"LayerSkip: skip must hold layer indices in [0, {n}) and keep at least one layer "
                f"(the target has {n} decoder layers), got {skip}"
            )
        return tuple(skip)

    def _install(self, skip: tuple[int, ...] | None) -> None:
        self.skip = skip
        kept = [i for i in range(self.num_layers) if skip is None or i not in skip]
        self.view = layer_view.LayerSubset(self.model, kept)
        self.cache = self.view.new_cache()
        self.cached = torch.zeros(0, dtype=torch.long)  # [c] the tokens whose keys/values are in self.cache
        self.start = 0  # the position of self.cached[0]

    def recalibrate(self) -> None:
        """Forget the skip set; the next proposal chooses one again on the then-committed tokens."""
        self._install(None)

    @torch.no_grad()
    def calibrate(self, input_ids: Tensor, verify_cost: Callable[[int], float] = DEFAULT_VERIFY_COST) -> Calibration:
        """Choose and install the skip set on the last `calibrate_tokens` of `input_ids` ([t]).
        `verify_cost`: `Context.verify_cost`."""
        ids = input_ids.reshape(-1).long()[-self.calibrate_tokens :]  # [w]
        w = ids.numel()
        if w < 2:
            raise ValueError(f"LayerSkip.calibrate: needs at least 2 tokens, got {w}")
        positions = torch.arange(w)
        n = self.num_layers
        with self._route(w):
            full = layer_view.LayerSubset(self.model, range(n))(ids, positions, return_states=True)
        reference = full.logits.argmax(-1)  # [w]
        states = full.states  # [n + 1, w, hidden]: input of each layer, then the last output
        middle = list(range(1, n - 1))
        full_weights = layer_view.LayerSubset(self.model, range(n)).weights()

        def value(skip: tuple[int, ...], a: float) -> float:
            kept = [i for i in range(n) if i not in skip]
            # one draft token, in target forwards
            cost = layer_view.LayerSubset(self.model, kept).weights() / full_weights
            return layer_view.draft_value(a, cost, self.draft_tokens, verify_cost)

        tried: list[tuple[tuple[int, ...], float, float]] = []
        seen: dict[tuple[int, ...], tuple[float, float]] = {}

        def score(skip: tuple[int, ...]) -> tuple[float, float]:
            if skip in seen:
                return seen[skip]
            first = skip[0]
            kept = [i for i in range(first, n) if i not in skip]
            with self._route(w):
                out = layer_view.LayerSubset(self.model, kept)(None, positions, hidden=states[first])
            a = float((out.logits.argmax(-1) == reference).double().mean())
            seen[skip] = a, value(skip, a)
            tried.append((skip, *seen[skip]))
            return seen[skip]

        if not middle:  # two layers or fewer: nothing may be skipped
            best, best_a, best_v = (), 1.0, value((), 1.0)
        else:
            cos = F.cosine_similarity(states[:-1].double(), states[1:].double(), dim=-1).mean(-1)  # [n]
            influence = {i: 1.0 - float(cos[i]) for i in middle}
            order = sorted(middle, key=lambda i: (influence[i], i))  # least influential first
            max_k = max(1, min(len(middle), round(self.max_skip_ratio * len(middle))))
            grid_points = min(max_k, max(1, self.calibrate_trials // 2))
            ks = sorted({max(1, round(max_k * (j + 1) / grid_points)) for j in range(grid_points)})
            best, best_a, best_v = None, 0.0, -1.0
            for k in ks:
                skip = tuple(sorted(order[:k]))
                a, v = score(skip)
                if v > best_v:
                    best, best_a, best_v = skip, a, v
            rng = torch.Generator().manual_seed(self.seed)
            draws = 0
            while len(tried) < self.calibrate_trials and draws < 4 * self.calibrate_trials:
                draws += 1  # bounded: around a small middle every swap may have been tried
                outside = [i for i in middle if i not in best]
                if not outside:
                    break
                drop = best[int(torch.randint(len(best), (1,), generator=rng))]
                add = outside[int(torch.randint(len(outside), (1,), generator=rng))]
                skip = tuple(sorted(set(best) - {drop} | {add}))
                if skip in seen:
                    continue
                a, v = score(skip)
                if v > best_v:
                    best, best_a, best_v = skip, a, v
        self.calibration = Calibration(best, best_a, best_v, w, tried)
        self._install(best)
        return self.calibration

    # ---- drafter protocol ---------------------------------------------------------------------
    def begin(self, target) -> None:
        if target is not self.model:
            raise ValueError(
                f"LayerSkip: built on one {type(self.model).__name__} but asked to draft for another model "
                f"({type(target).__name__}); it drafts with the target's own layers, so build LayerSkip(target) "
                "with the model you decode with"
            )
        self.cache = self.view.new_cache()
        self.cached = torch.zeros(0, dtype=torch.long)
        self.start = 0  # the position of self.cached[0]

    def _forward(self, ids: Tensor, positions: Tensor, mask: Tensor | None, last_only: bool = False) -> Tensor:
        with self._route(ids.numel()):
            out = self.view(ids, positions, cache=self.cache, mask=mask, last_only=last_only)
        return torch.log_softmax(out.logits.float(), dim=-1)  # [m, vocab] on the model's device

    @torch.no_grad()
    def propose(self, ctx: Context) -> TokenTree:
        self._route = ctx.packing.route(self.model)  # the runtime decides which forwards run packed
        ids = ctx.input_ids
        depth = self.draft_tokens if ctx.max_depth is None else min(self.draft_tokens, ctx.max_depth)
        if depth < 1:
            return TokenTree.empty()
        if self.skip is None:
            if ids.numel() < layer_view.MIN_WINDOW:
                return TokenTree.empty()
            self.calibrate(ids, ctx.verify_cost)
        tree, self.cached, self.start = cached_drafting.draft(
            self._forward, self.cache, self.cached, ids, depth=depth, topk=self.topk, width=self.width,
            budget=self.budget, min_confidence=self.min_confidence, dtype=self.model.dtype,
            start=self.start, window=self.window,
            cache_length=self.view.cached,
        )
        return tree

    def update(self, feedback: Feedback) -> None:
        pass  # the cache is reconciled lazily in propose
