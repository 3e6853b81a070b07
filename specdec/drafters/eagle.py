"""EAGLE: a one-layer feature-level head drafts a dynamic tree (EAGLE-1/2, EAGLE-3's draft vocabulary).

`EagleHead`: pair p is (f_p, x_{p+1}), the target's post-norm last-layer feature at p and the
next token; ``fc([embed(x_{p+1}); f_p])`` feeds one decoder layer of the target's class with its
own KV cache, and the target's frozen final norm and lm_head turn the output into f_{p+1} and
logits for x_{p+2}. ``Context.hidden_states[-1]`` is the feature of the token before the root,
so a node at depth d sits at position t - 2 + d. The cache is reconciled with ``ctx.input_ids``
by common prefix; pairs whose features never arrived are left out (less informed, never wrong).
Trees grow with `specdec.trees.expand` and are cut by the sizing rule over calibrated scores.

Boundary: the core interface, `specdec.kv`, `specdec.trees` and this package's checkpoint, mask
and vocabulary helpers; Llama-layout decoders only (checked on construction).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from specdec import kv
from specdec.drafter import Context, Feedback
from specdec.drafters import checkpoint, eagle3
from specdec.drafters.eagle3 import Eagle3Head
from specdec.drafters.layer_view import causal_mask
from specdec.drafters.vocab import DraftVocab, PackedDraft, rows, stored, stripped
from specdec.trees import RunningRate, TokenTree, best_size, expand, tree_mask

KIND = "eagle"


def _decoder_parts(model) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(last decoder layer, rotary embedding, final norm) of a Llama-layout causal LM."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    parts = {"layers": layers, "rotary_emb": getattr(decoder, "rotary_emb", None),
             "norm": getattr(decoder, "norm", None)}
    missing = [name for name, part in parts.items() if not isinstance(part, nn.Module)]
    if missing or not len(layers):
        raise ValueError(
            f"Eagle: {type(model).__name__} lacks {', '.join(missing) or 'decoder layers'} where the Llama layout "
            "has them (get_decoder() with layers, rotary_emb and norm); EAGLE heads support Llama-style decoders only"
        )
    return layers[-1], parts["rotary_emb"], parts["norm"]


class EagleHead(nn.Module):
    """fc (2H -> H) + one decoder layer of the target's class, with its own rotary table.

    ``config`` is the head's one-layer copy of the target config (`for_target` builds it);
    `kv.new_cache(head)` gives the head's cache."""

    def __init__(self, config, layer_class: type[nn.Module], rotary_class: type[nn.Module]):
        super().__init__()
        hidden = int(config.hidden_size)
        self.config = config
        self.hidden_size = hidden
        self.fc = nn.Linear(2 * hidden, hidden, bias=True)
        self.layer = layer_class(config, 0)
        self.rotary = rotary_class(config=config)

    @classmethod
    def for_target(cls, model, *, init_from_last_layer: bool = False) -> EagleHead:
        """A fresh head for `model`: its decoder-layer class, a config copy with one layer (the
        target's config is not touched), in the target's dtype and device. With
        `init_from_last_layer` the layer starts as a copy of the target's last layer."""
        last, rotary, _ = _decoder_parts(model)
        config = copy.deepcopy(model.config)
        config.num_hidden_layers = 1
        if getattr(config, "layer_types", None) is not None:
            config.layer_types = list(config.layer_types)[-1:]  # the head plays the role of the last layer
        head = cls(config, type(last), type(rotary))
        if init_from_last_layer:
            head.layer.load_state_dict(last.state_dict())
        return head.to(device=model.device, dtype=model.dtype)

    @property
    def layer_name(self) -> str:
        return type(self.layer).__name__

    @property
    def feature_size(self) -> int:
        """Width of a real pair's feature: the target's last-layer state."""
        return self.hidden_size

    hidden_layers = (-1,)  # the target states it reads: the last layer's, post-norm

    def forward(self, features: Tensor, embeds: Tensor, position_ids: Tensor, attention_mask: Tensor,
                cache=None) -> Tensor:
        """features, embeds [b, m, H] (pair p: f_p and the embedding of x_{p+1}), position_ids
        [b, m], attention_mask [b or 1, 1, m, cached + m] additive float -> [b, m, H] the layer's
        output, before the target's final norm."""
        dtype = self.fc.weight.dtype
        x = self.fc(torch.cat([embeds.to(dtype), features.to(dtype)], dim=-1))
        rope = self.rotary(x, position_ids)
        out = self.layer(
            x,
            attention_mask=attention_mask.to(dtype),
            position_ids=position_ids,
            position_embeddings=rope,
            **kv.cache_kwargs(self.layer, cache),
            use_cache=cache is not None,
        )
        return out[0] if isinstance(out, tuple) else out  # older releases return a tuple


@dataclass(frozen=True)
class FrozenTarget:
    """The target's embedding, final-norm weight and lm_head, used by the head without copies
    and without gradients into the target (weights are detached; the embedding is looked up
    under no_grad)."""

    embedding: nn.Module
    norm_weight: Tensor  # [H]
    norm_eps: float
    lm_weight: Tensor  # [vocab, H]
    lm_bias: Tensor | None

    @classmethod
    def of(cls, model) -> FrozenTarget:
        _, _, norm = _decoder_parts(model)
        weight = getattr(norm, "weight", None)
        eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
        if not isinstance(weight, Tensor) or eps is None:
            raise ValueError(f"Eagle: {type(model).__name__}'s final norm ({type(norm).__name__}) is not an RMS norm "
                             "with a weight and an epsilon; EAGLE heads support Llama-style decoders only")
        head = model.get_output_embeddings()
        bias = getattr(head, "bias", None)
        frozen = cls(model.get_input_embeddings(), weight.detach(), float(eps), head.weight.detach(),
                     None if bias is None else bias.detach())
        with torch.no_grad():  # the norm is applied as F.rms_norm: refuse a norm that computes otherwise
            probe = torch.randn(3, weight.shape[0], generator=torch.Generator().manual_seed(0)).to(weight)
            theirs, mine = norm(probe).double(), frozen.norm(probe).double()
            if not torch.allclose(mine, theirs, rtol=1e-3, atol=1e-3 * float(theirs.abs().max())):
                raise ValueError(f"Eagle: {type(model).__name__}'s final norm ({type(norm).__name__}) is not "
                                 "weight * x / rms(x); EAGLE heads support Llama-style decoders only")
        return frozen

    def embed(self, ids: Tensor) -> Tensor:
        with torch.no_grad():
            return self.embedding(ids)

    def norm(self, x: Tensor) -> Tensor:
        """The target's final norm: layer output -> feature (post-norm space)."""
        return F.rms_norm(x, (x.shape[-1],), self.norm_weight.to(x.dtype), self.norm_eps)

    def logits(self, feature: Tensor) -> Tensor:
        """[..., H] features -> [..., vocab] the target's lm_head (its rows kept by `over`)."""
        return F.linear(feature.to(self.lm_weight.dtype), self.lm_weight, self.lm_bias)

    def over(self, ids: Tensor) -> FrozenTarget:
        """The same parts with the lm_head cut to the rows of token ids `ids` (copied out once,
        contiguous): `logits(...)[..., j]` then scores token ``ids[j]``."""
        weight, bias = rows(self.lm_weight, self.lm_bias, ids)
        return replace(self, lm_weight=weight, lm_bias=bias)


def predict(head, frozen: FrozenTarget, features: Tensor, tokens: Tensor, position_ids: Tensor,
            attention_mask: Tensor, cache=None) -> Tensor:
    """Pairs (features [b, m, F], next tokens [b, m]) -> [b, m, H] predicted next features (an
    `Eagle3Head`'s: its layer output, before its own norm). `head` may be wrapped (DDP): only its
    forward is called. Shared by drafting and training, so both compute the same function."""
    out = head(features, frozen.embed(tokens), position_ids, attention_mask, cache)
    return out if isinstance(getattr(head, "module", head), Eagle3Head) else frozen.norm(out)


class Eagle:
    needs_hidden_states = True

    def __init__(
        self, model, head: EagleHead | Eagle3Head, *, depth: int = 6, topk: int = 8, width: int | None = None,
        budget: int | None = 32, min_confidence: float = 0.0, min_gain: float = 0.1, calibration_decay: float = 0.95,
        draft_vocab: Tensor | None = None, metadata: dict | None = None,
    ):
        """`depth`: most levels of the draft tree (head steps per proposal; `min_gain` decides how
        many of them a proposal runs, so levels 5-6 cost only where a node is still likely; with
        ``min_gain=0`` every proposal runs all of them). Each frontier node offers
        its `topk` most likely next tokens; the `width` (default `topk`) best offers by cumulative
        draft probability form the next level; the `budget` best nodes overall are kept (None:
        all), fewer when the target's verify-cost curve says a smaller tree pays more.
        `min_confidence`: stop growing once no frontier node's best token is that likely.
        `min_gain`: stop growing once no frontier node's calibrated acceptance chance (running
        acceptance ratio x cumulative draft probability, what `size` counts) reaches it: a level
        costs a head step, and a node can only be less likely than its parent (default: see
        docs/design.md). 0: always grow `depth` levels.
        `calibration_decay`: weight of past steps in the running acceptance calibration.
        `draft_vocab`: [V] token ids the head scores (with each request's context tokens added);
        None: the whole vocabulary. `from_pretrained` passes the checkpoint's, if it has one. An
        `Eagle3Head` scores its own lm_head's columns (its d2t), so it takes none.
        `metadata`: the checkpoint's training record, saved again by `save_pretrained`."""
        if not isinstance(head, (EagleHead, Eagle3Head)):
            raise TypeError(f"Eagle: head must be an EagleHead or an Eagle3Head, got {type(head).__name__}")
        if isinstance(head, Eagle3Head) and draft_vocab is not None:
            raise ValueError("Eagle: an Eagle3Head drafts over its own lm_head's vocabulary (d2t); pass no draft_vocab")
        for name, value in (("depth", depth), ("topk", topk)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Eagle: {name} must be an int >= 1, got {value!r}")
        if width is not None and (not isinstance(width, int) or width < 1):
            raise ValueError(f"Eagle: width must be an int >= 1 or None (= topk), got {width!r}")
        if budget is not None and (not isinstance(budget, int) or budget < 1):
            raise ValueError(f"Eagle: budget must be an int >= 1 or None (no cut), got {budget!r}")
        if not 0 <= min_confidence < 1:
            raise ValueError(f"Eagle: min_confidence must be in [0, 1), got {min_confidence}")
        if not 0 <= min_gain < 1:
            raise ValueError(f"Eagle: min_gain must be in [0, 1), got {min_gain}")
        if not 0 < calibration_decay < 1:
            raise ValueError(f"Eagle: calibration_decay must be in (0, 1), got {calibration_decay}")
        self.model, self.head = model, head
        self.depth, self.topk, self.width, self.budget = depth, topk, width or topk, budget
        self.min_confidence, self.min_gain, self.calibration_decay = min_confidence, min_gain, calibration_decay
        self.metadata = dict(metadata or {})
        self._check(model)
        self._frozen = FrozenTarget.of(model)
        self._vocab = self._vocab_for(self._frozen, draft_vocab)
        self._route = PackedDraft(head, self._vocab, None)  # each proposal takes the runtime's (`Context.packing`)
        self._reset()
        # Accepted drafts per unit of the proposed trees' summed scores; the prior (1, 1) trusts
        # the draft probabilities until feedback says otherwise.
        self._calibration = RunningRate(1.0, 1.0, calibration_decay)

    @property
    def draft_vocab(self) -> Tensor | None:
        """[V] sorted token ids of the draft vocabulary, or None: every row."""
        return self._vocab.ids

    @property
    def hidden_layers(self) -> tuple[int, ...]:
        """The target hidden states this head reads (HF ``output_hidden_states`` indices)."""
        return self.head.hidden_layers

    def _vocab_for(self, frozen: FrozenTarget, ids: Tensor | None) -> DraftVocab:
        if isinstance(self.head, Eagle3Head):
            return DraftVocab.own(self.head.lm_head, self.head.draft_ids)
        return DraftVocab(frozen.lm_weight, frozen.lm_bias, ids, "Eagle")

    def _check(self, target) -> None:
        if isinstance(self.head, Eagle3Head):
            self.head.check(target)
            return
        if target.config.hidden_size != self.head.hidden_size:
            raise ValueError(f"Eagle: the head takes hidden size {self.head.hidden_size} but the target's is "
                             f"{target.config.hidden_size}; use a head trained for this target")
        layer = type(_decoder_parts(target)[0]).__name__
        if layer != self.head.layer_name:
            raise ValueError(f"Eagle: the head is a {self.head.layer_name} but the target's layers are {layer}; "
                             "use a head trained for this target")

    def _reset(self) -> None:
        self.cache = kv.new_cache(self.head)
        self._ids = torch.zeros(0, dtype=torch.long)  # [k] committed tokens the cached pairs were built from
        self._pos = torch.zeros(0, dtype=torch.long)  # [c] position of each cached pair, ascending
        weight = self.head.fc.weight
        self._feats = weight.new_zeros(0, self.head.feature_size)  # [c, F] the real feature of each cached pair
        self._vocab.reset()

    # ---- checkpoints -----------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, directory, model, *, check_base_model: bool = True, **kwargs) -> Eagle:
        """A head saved by `save_pretrained` (or `specdec train eagle`/`eagle3`), validated against
        `model`; an EAGLE-3 head in the SpecForge or speculators layout loads too (`eagle3_formats`)."""
        from specdec.drafters import eagle3_formats

        if eagle3_formats.foreign(directory) or checkpoint.header_of(directory)["drafter"] == eagle3.KIND:
            head, metadata = eagle3_formats.read(directory, model, check_base_model=check_base_model)
            return cls(model, head, metadata=metadata, **kwargs)
        ckpt = checkpoint.load(directory, KIND, model, check_base_model=check_base_model)
        where = f"drafter checkpoint {str(directory)!r}"
        layer = type(_decoder_parts(model)[0]).__name__
        if ckpt.config.get("decoder_layer") != layer:
            raise checkpoint.CheckpointError(
                f"{where} holds a head built from {ckpt.config.get('decoder_layer')!r} layers but this model's layers "
                f"are {layer!r}; load it with the model it was trained for, or train one (specdec train eagle)")
        head = EagleHead.for_target(model)
        ckpt, vocab = stripped(ckpt, directory, model.get_output_embeddings().out_features)
        try:
            head.load_state_dict(ckpt.tensors)
        except RuntimeError as e:
            raise checkpoint.CheckpointError(f"{where} is corrupt: its weights do not match its config ({e})") from None
        kwargs.setdefault("draft_vocab", vocab)  # an explicit draft_vocab (None: the whole vocabulary) wins
        return cls(model, head, metadata=ckpt.metadata, **kwargs)

    @classmethod
    def shipped(cls, model, **kwargs) -> Eagle:
        """The head shipped with specdec for this model (`checkpoint.shipped`), or a clear error."""
        return cls.from_pretrained(checkpoint.shipped(KIND, model), model, **kwargs)

    def save_pretrained(self, directory) -> Path:
        if isinstance(self.head, Eagle3Head):
            return checkpoint.save(directory, checkpoint.Checkpoint(
                eagle3.KIND, checkpoint.describe(self.model), self.head.describe(), dict(self.head.state_dict()),
                self.metadata))
        config, tensors = stored({"hidden_size": self.head.hidden_size, "decoder_layer": self.head.layer_name},
                                 dict(self.head.state_dict()), self.draft_vocab)
        return checkpoint.save(directory, checkpoint.Checkpoint(
            KIND, checkpoint.describe(self.model), config, tensors, self.metadata))

    # ---- drafting --------------------------------------------------------------------------
    def begin(self, target) -> None:
        self._check(target)
        if target is not self.model:  # cached pairs hold another model's features
            frozen = FrozenTarget.of(target)
            # refused before anything changes
            vocab = self._vocab_for(frozen, self.draft_vocab)
            self.model, self._frozen, self._vocab = target, frozen, vocab
            self._reset()
        else:  # the cache stays (propose keeps its common prefix with the next prompt); the last
            self._vocab.reset()  # request's context tokens leave the draft vocabulary

    @property
    def acceptance_ratio(self) -> float:
        """Accepted drafts per unit of summed draft score, over recent steps."""
        return self._calibration.rate

    def _reconcile(self, ids: Tensor, hidden: Tensor | None) -> tuple[Tensor, Tensor] | None:
        """Drop stale pairs; return the (positions [n], features [n, H]) to feed now, ending with
        the pair at t - 2, or None when its feature is unknown."""
        t = ids.numel()
        n = min(self._ids.numel(), t)
        m = int((self._ids[:n] == ids[:n]).long().cumprod(0).sum())
        keep = int((self._pos + 2 <= m).sum())
        kv.truncate(self.cache, keep)  # absolute: also drops what a head forward cut off part-way left behind
        self._pos, self._feats = self._pos[:keep], self._feats[:keep]
        last = int(self._pos[-1]) if keep else -1
        if hidden is not None and hidden.shape[0] > 0:
            h = min(hidden.shape[0], t - 1)
            positions = torch.arange(t - 1 - h, t - 1)  # the rows' positions: the last is t - 2
            covered = int((self._pos >= t - 1 - h).sum())
            if last >= t - 1 - h and covered < last - (t - 1 - h) + 1:
                # The rows fill a gap among cached pairs (e.g. a fresh verifier prefilled what
                # this cache missed while paused): re-feed the whole span they cover.
                kv.drop_last(self.cache, covered)
                keep -= covered
                self._pos, self._feats = self._pos[:keep], self._feats[:keep]
                last = int(self._pos[-1]) if keep else -1
            new = positions > last  # rows already cached are skipped; rows beyond a gap still count
            if new.any():
                return positions[new], hidden[-h:][new.to(hidden.device)].to(self._feats)
        if last == t - 2:  # cached already: feed it again for its output
            kv.drop_last(self.cache, 1)
            positions, feats = self._pos[-1:], self._feats[-1:]
            self._pos, self._feats = self._pos[:-1], self._feats[:-1]
            return positions, feats
        return None

    def _step(self, feats: Tensor, tokens: Tensor, positions: Tensor, mask: Tensor) -> Tensor:
        """One head forward over m pairs -> [m, H] predicted features."""
        device = self.head.fc.weight.device
        with self._route(tokens.numel()):
            return predict(self.head, self._frozen, feats.to(device)[None], tokens.to(device)[None],
                           positions.to(device)[None], mask.to(device), self.cache)[0]

    def _log_probs(self, feats: Tensor) -> Tensor:
        with self._route(feats.shape[0]):
            logits = self._vocab.logits(self.head.norm(feats) if isinstance(self.head, Eagle3Head) else feats)
        # [m, V' + c] over the draft vocabulary's rows, normalised over them: the tree's scores
        # overstate q by the mass outside, which `size`'s running calibration absorbs. On the
        # head's device: `expand` brings only each level's top-k to the host.
        return torch.log_softmax(logits.float(), dim=-1)

    @torch.no_grad()
    def propose(self, ctx: Context) -> TokenTree:
        ids = ctx.input_ids
        t = ids.numel()
        # Head steps over at least the target's crossover rows run packed (a proxy for the head's own).
        self._route = self._route.rebuilt(self.head, self._vocab, ctx.packing.packed_from(self.model))
        depth = self.depth if ctx.max_depth is None else min(self.depth, ctx.max_depth)
        if depth < 1 or t < 2:  # a one-token prompt has no pair before the root
            return TokenTree.empty()
        pending = self._reconcile(ids, ctx.hidden_states)
        self._vocab.admit(ids)
        self._ids = ids.clone()
        if pending is None:
            return TokenTree.empty()
        positions, feats = pending
        dtype = self.head.fc.weight.dtype
        cached = self._pos.numel()
        root_out = self._step(feats, ids[positions + 1], positions, causal_mask(cached, positions.numel(), dtype))
        self._pos = torch.cat([self._pos, positions])
        self._feats = torch.cat([self._feats, feats])
        real = self._pos.numel()  # the tree's nodes follow these slots in the cache
        outs: dict[int, Tensor] = {-1: root_out[-1]}  # node -> its predicted feature (the root's: f_{t-1})

        def step(tree: TokenTree, frontier: list[int]) -> Tensor:
            if frontier == [-1]:
                return self._log_probs(outs[-1][None])  # [1, vocab]
            rows = torch.tensor(frontier)
            parent_feats = torch.stack([outs[int(p)] for p in tree.parents[rows]])  # [f, H]
            mask = tree_mask(tree, rows, frontier[0], real, dtype)
            out = self._step(parent_feats, tree.tokens[rows], t - 2 + tree.depths()[rows], mask)
            outs.update(zip(frontier, out))
            return self._log_probs(out)  # [f, vocab]

        tree = expand(step, depth=depth, topk=self.topk, width=self.width, budget=self.budget,
                      min_confidence=self.min_confidence, min_score=self._min_score(), vocab=self._vocab.tokens)
        kv.drop_last(self.cache, kv.length(self.cache) - real)  # tree nodes carry guessed features
        if len(tree) > 1:
            tree = self.size(tree, ctx.verify_cost)
        return tree

    def _min_score(self) -> float:
        """`min_gain` as a bar on cumulative draft probability (calibrated chance = ratio x score)."""
        if self.min_gain == 0:
            return 0.0
        ratio = self.acceptance_ratio
        return self.min_gain / ratio if ratio > 0 else math.inf  # nothing accepted lately: one level

    def size(self, tree: TokenTree, verify_cost: Callable[[int], float]) -> TokenTree:
        """The best-scored n nodes of `tree` (an ancestor-closed set), with n maximising expected
        tokens per verify cost: (1 + sum of the n calibrated acceptance chances) / verify_cost(n)."""
        scores = tree.scores.tolist()
        order = sorted(range(len(tree)), key=lambda i: (-scores[i], i))
        ratio = self.acceptance_ratio
        n = best_size([min(1.0, ratio * scores[i]) for i in order], verify_cost, min_size=1).n
        return tree if n == len(tree) else tree.subtree(order[:n])

    def update(self, feedback: Feedback) -> None:
        # The cache is reconciled lazily in propose; feedback calibrates the tree size.
        tree = feedback.tree
        if len(tree) and tree.scores is not None:
            self._calibration.add(len(feedback.accepted_nodes), float(tree.scores.sum()))
