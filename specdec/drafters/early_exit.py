"""Self-speculative drafting from an early exit of the target (LayerSkip, Elhoushi et al. 2024):
its first `exit_layer` decoder layers, its final norm and lm_head, optionally a trained adapter.

The draft is the target through a `LayerSubset` (nothing copied) with its own KV cache
(`cached_drafting`): a greedy chain or, with ``topk > 1``, a dynamic tree. `ExitAdapter` adds
``up(silu(down(n)))`` to the normed early state, folded into the lm_head once per `begin`; ``up``
starts at zero, so an untrained adapter drafts like the plain exit. Unless fixed, the exit layer
is calibrated on recent committed tokens by ``max_d (1 + a + ... + a^d) / (verify(d) + d * c)``
(agreement `a`, weight cost `c`); if no exit beats plain decoding it proposes nothing until
`recalibrate()`.

Boundary: the core interface, `specdec.trees`, `LayerSubset`, `cached_drafting` and the
checkpoint helpers (drafter kind ``"early-exit"``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from specdec.drafter import Context, Feedback
from specdec.drafters import cached_drafting, checkpoint, layer_view
from specdec.packing import PackedRoute
from specdec.trees import DEFAULT_VERIFY_COST, TokenTree

KIND = "early-exit"


class ExitAdapter(nn.Module):
    """``n -> n + up(silu(down(n)))`` on the target's normed state after `exit_layer` layers;
    the target's lm_head follows. ``up`` starts at zero (the plain early exit)."""

    def __init__(self, hidden_size: int, exit_layer: int, rank: int = 64):
        super().__init__()
        for name, value in (("hidden_size", hidden_size), ("exit_layer", exit_layer), ("rank", rank)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ExitAdapter: {name} must be an int >= 1, got {value!r}")
        self.hidden_size, self.exit_layer, self.rank = hidden_size, exit_layer, rank
        self.down = nn.Linear(hidden_size, rank, bias=False)
        self.up = nn.Linear(rank, hidden_size, bias=False)
        nn.init.zeros_(self.up.weight)

    def config(self) -> dict:
        return {"hidden_size": self.hidden_size, "exit_layer": self.exit_layer, "rank": self.rank}

    def bottleneck(self, normed: Tensor) -> Tensor:
        """[..., hidden] -> [..., rank]: the input of ``up``."""
        return F.silu(self.down(normed.to(self.down.weight.dtype)))

    def forward(self, normed: Tensor) -> Tensor:
        """[..., hidden] normed early state -> [..., hidden] the state the lm_head reads."""
        return normed + self.up(self.bottleneck(normed)).to(normed.dtype)


@dataclass(frozen=True)
class Calibration:
    exit_layer: int  # the chosen number of layers before the exit
    agreement: float  # its teacher-forced next-token agreement with the target on the window
    value: float  # its expected speed over plain decoding, by the module docstring's cost model
    window: int  # tokens it was measured on
    # Every candidate tried, in order: (exit layer, agreement, value).
    tried: list[tuple[int, float, float]] = field(default_factory=list, repr=False)

    @property
    def pays_off(self) -> bool:
        """Whether the chosen exit is expected to beat plain decoding (else the drafter proposes nothing)."""
        return self.value > 1.0


class EarlyExit:
    needs_hidden_states = False

    def __init__(
        self,
        model,
        *,
        exit_layer: int | float | None = None,
        adapter: ExitAdapter | None = None,
        draft_tokens: int = 6,
        topk: int = 1,
        width: int | None = None,
        budget: int | None = None,
        min_confidence: float = 0.5,
        calibrate_tokens: int = 64,
        calibrate_trials: int = 8,
        window: int | None = 256,
        metadata: dict | None = None,
    ):
        """`model`: the target (the drafter runs its first layers; `begin` refuses any other
        model). `exit_layer`: decoder layers run before the exit, an int in [1, num_layers]
        (num_layers drafts with the whole target), a float in (0, 1) for that fraction of the
        depth, or None to calibrate on the prompt (see the module docstring). `adapter`: a trained
        `ExitAdapter`; it fixes the exit layer it was trained for. `draft_tokens`: draft depth.
        ``topk = 1`` drafts a greedy chain; ``topk > 1`` a tree whose levels keep the `width` best
        nodes, cut to `budget` nodes. `min_confidence`: stop drafting deeper once the best next
        token is less likely than this (0: always `draft_tokens`). `calibrate_tokens`: the
        calibration window (the most recent committed tokens). `calibrate_trials`: candidate exits
        scored per calibration.
        `metadata`: the adapter checkpoint's training record, saved again by `save_pretrained`.
        `window`: when the draft (re)starts on more than this many committed tokens (a long
        prompt, a new turn), it reads only the last `window` of them (None: all);
        the view's prefill costs most of a target forward."""
        cached_drafting.check_window("EarlyExit", window)
        if draft_tokens < 1 or topk < 1:
            raise ValueError(f"EarlyExit: draft_tokens and topk must be >= 1, got {draft_tokens}, {topk}")
        if not 0 <= min_confidence < 1:
            raise ValueError(
                f"EarlyExit: min_confidence must be in [0, 1) (0 = always draft draft_tokens), got {min_confidence}"
            )
        if calibrate_tokens < layer_view.MIN_WINDOW:
            raise ValueError(f"EarlyExit: calibrate_tokens must be >= {layer_view.MIN_WINDOW}, got {calibrate_tokens}")
        if calibrate_trials < 1:
            raise ValueError(f"EarlyExit: calibrate_trials must be >= 1, got {calibrate_trials}")
        layer_view.check_faithful(model)
        self.model = model
        self.num_layers = layer_view.LayerSubset(model, []).num_layers
        self.draft_tokens, self.topk = draft_tokens, topk
        self.width = 1 if topk == 1 else (width or topk)
        self.budget = budget
        self.min_confidence = min_confidence
        self.calibrate_tokens, self.calibrate_trials = calibrate_tokens, calibrate_trials
        self.window = window
        self.metadata = dict(metadata or {})
        self.adapter = adapter
        self.calibration: Calibration | None = None
        self._route = PackedRoute(model, None)
        self._norm = model.get_decoder().norm  # the target's own final norm (LayerSubset checked it exists)
        self._fold: Tensor | None = None  # [vocab, rank] lm_head weight @ adapter up weight
        if adapter is not None:
            self._check_adapter(adapter, exit_layer)
            exit_layer = adapter.exit_layer
        self._refold()
        self.exit_layer: int | None = None  # None until calibrated
        self._install(None if exit_layer is None else self._checked_exit(exit_layer))

    # ---- exit layer and adapter ---------------------------------------------------------------
    def _checked_exit(self, exit_layer) -> int:
        n = self.num_layers
        if isinstance(exit_layer, float) and not isinstance(exit_layer, bool):
            if not 0 < exit_layer < 1:
                raise ValueError(
                    f"EarlyExit: a float exit_layer is a fraction of the depth in (0, 1), got {exit_layer}; "
                    f"pass an int in [1, {n}] for a layer count"
                )
            return max(1, round(exit_layer * n))
        if isinstance(exit_layer, bool) or not isinstance(exit_layer, int) or not 1 <= exit_layer <= n:
            raise ValueError(
                f"EarlyExit: exit_layer must be an int in [1, {n}] (the target has {n} decoder layers), a fraction "
                f"in (0, 1), or None to calibrate; got {exit_layer!r}"
            )
        return exit_layer

    def _check_adapter(self, adapter, exit_layer) -> None:
        if not isinstance(adapter, ExitAdapter):
            raise TypeError(f"EarlyExit: adapter must be an ExitAdapter, got {type(adapter).__name__}")
        hidden = self.model.config.hidden_size
        if adapter.hidden_size != hidden or not 1 <= adapter.exit_layer <= self.num_layers:
            raise ValueError(
                f"EarlyExit: the adapter was built for hidden size {adapter.hidden_size} at exit layer "
                f"{adapter.exit_layer}, but the target has hidden size {hidden} and {self.num_layers} layers; "
                "use an adapter trained for this target"
            )
        if exit_layer is not None and exit_layer != adapter.exit_layer:
            raise ValueError(
                f"EarlyExit: exit_layer={exit_layer!r} but the adapter was trained to exit after layer "
                f"{adapter.exit_layer}; leave exit_layer unset when passing an adapter"
            )

    def _install(self, exit_layer: int | None) -> None:
        self.exit_layer = exit_layer
        self.view = layer_view.LayerSubset(self.model, range(exit_layer or 0))
        self.cache = self.view.new_cache()
        self.cached = torch.zeros(0, dtype=torch.long)  # [c] the tokens whose keys/values are in self.cache
        self.start = 0  # the position of self.cached[0]

    def _refold(self) -> None:
        """Fold the adapter's ``up`` into the lm_head: [vocab, hidden] @ [hidden, rank]."""
        if self.adapter is None:
            self._fold = None
            return
        head = self.model.get_output_embeddings().weight
        with torch.no_grad():
            up = self.adapter.up.weight.to(device=head.device, dtype=head.dtype)
            self._fold = head @ up  # [vocab, rank]

    def recalibrate(self) -> None:
        """Forget the calibrated exit; the next proposal chooses one again (no-op with an adapter or
        a fixed exit_layer, whose exit is not calibrated)."""
        if self.calibration is not None:
            self.calibration = None
            self._install(None)

    @torch.no_grad()
    def calibrate(self, input_ids: Tensor, verify_cost: Callable[[int], float] = DEFAULT_VERIFY_COST) -> Calibration:
        """Choose and install the exit layer on the last `calibrate_tokens` of `input_ids` ([t]).
        `verify_cost`: `Context.verify_cost`."""
        if self.adapter is not None:
            raise ValueError("EarlyExit.calibrate: the adapter fixes the exit layer it was trained for")
        ids = input_ids.reshape(-1).long()[-self.calibrate_tokens :]  # [w]
        w = ids.numel()
        if w < 2:
            raise ValueError(f"EarlyExit.calibrate: needs at least 2 tokens, got {w}")
        n = self.num_layers
        positions = torch.arange(w)
        full_view = layer_view.LayerSubset(self.model, range(n))
        with self._route(w):
            full = full_view(ids, positions, return_states=True)
        reference = full.logits.argmax(-1)  # [w]
        states = full.states  # [n + 1, w, hidden]: input of each layer, then the last output
        full_weights = full_view.weights()
        exit_only = layer_view.LayerSubset(self.model, [])  # norm + lm_head on a given state

        candidates = list(range(1, n)) or [1]  # exiting after every layer is the target itself
        if len(candidates) > self.calibrate_trials:  # evenly spaced, each the middle of its share
            m = self.calibrate_trials
            candidates = sorted({candidates[round((j + 0.5) * len(candidates) / m - 0.5)] for j in range(m)})
        tried: list[tuple[int, float, float]] = []
        for k in candidates:
            with self._route(w):
                logits = exit_only(None, positions, hidden=states[k]).logits  # [w, vocab]
            a = float((logits.argmax(-1) == reference).double().mean())
            # one draft token, in target forwards
            cost = layer_view.LayerSubset(self.model, range(k)).weights() / full_weights
            best = layer_view.draft_value(a, cost, self.draft_tokens, verify_cost)
            tried.append((k, a, best))
        k, a, v = max(tried, key=lambda r: (r[2], -r[0]))  # ties: the cheaper exit
        self.calibration = Calibration(k, a, v, w, tried)
        self._install(k)
        return self.calibration

    # ---- checkpoints ----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, directory, model, *, check_base_model: bool = True, **kwargs) -> EarlyExit:
        """An exit adapter saved by `save_pretrained` (or `specdec train early-exit`), validated
        against `model` (hidden size, vocabulary, layer count, base model name)."""
        ckpt = checkpoint.load(directory, KIND, model, check_base_model=check_base_model)
        adapter = checkpoint.instantiate(ckpt, ExitAdapter, directory)
        adapter.to(device=model.device, dtype=model.dtype).eval()
        return cls(model, adapter=adapter, metadata=ckpt.metadata, **kwargs)

    @classmethod
    def shipped(cls, model, **kwargs) -> EarlyExit:
        """The exit adapter shipped with specdec for this model (`checkpoint.shipped`), or a clear error."""
        return cls.from_pretrained(checkpoint.shipped(KIND, model), model, **kwargs)

    def save_pretrained(self, directory) -> Path:
        if self.adapter is None:
            raise ValueError(
                "EarlyExit.save_pretrained: this drafter has no adapter, so there is nothing to save; "
                "rebuild it with EarlyExit(model, exit_layer=k)"
            )
        return checkpoint.save(directory, checkpoint.Checkpoint(
            KIND, checkpoint.describe(self.model), self.adapter.config(), self.adapter.state_dict(), self.metadata))

    # ---- drafter protocol -----------------------------------------------------------------------
    def begin(self, target) -> None:
        if target is not self.model:
            raise ValueError(
                f"EarlyExit: built on one {type(self.model).__name__} but asked to draft for another model "
                f"({type(target).__name__}); it drafts with the target's own layers, so build EarlyExit(target) "
                "with the model you decode with"
            )
        self._refold()  # the adapter may have been trained further since the last generation
        self.cache = self.view.new_cache()
        self.cached = torch.zeros(0, dtype=torch.long)
        self.start = 0  # the position of self.cached[0]

    def _forward(self, ids: Tensor, positions: Tensor, mask: Tensor | None, last_only: bool = False) -> Tensor:
        with self._route(ids.numel()):
            out = self.view(ids, positions, cache=self.cache, mask=mask, last_only=last_only,
                            return_states=self.adapter is not None)
        logits = out.logits  # [m, vocab] (or [1, vocab])
        if self.adapter is not None:
            early = out.states[-1][-1:] if last_only else out.states[-1]  # [m, hidden] before the norm
            z = self.adapter.bottleneck(self._norm(early[None])[0])  # [m, rank]
            logits = logits + F.linear(z.to(self._fold.dtype), self._fold)
        return torch.log_softmax(logits.float(), dim=-1)  # [m, vocab] on the model's device

    @torch.no_grad()
    def propose(self, ctx: Context) -> TokenTree:
        self._route = ctx.packing.route(self.model)  # the runtime decides which forwards run packed
        ids = ctx.input_ids
        depth = self.draft_tokens if ctx.max_depth is None else min(self.draft_tokens, ctx.max_depth)
        if depth < 1:
            return TokenTree.empty()
        if self.exit_layer is None:
            if ids.numel() < layer_view.MIN_WINDOW:
                return TokenTree.empty()
            self.calibrate(ids, ctx.verify_cost)
        if self.calibration is not None and not self.calibration.pays_off:
            return TokenTree.empty()
        tree, self.cached, self.start = cached_drafting.draft(
            self._forward, self.cache, self.cached, ids, depth=depth, topk=self.topk, width=self.width,
            budget=self.budget, min_confidence=self.min_confidence, dtype=self.model.dtype,
            start=self.start, window=self.window,
            cache_length=self.view.cached,
        )
        return tree

    def update(self, feedback: Feedback) -> None:
        pass  # the cache is reconciled lazily in propose
