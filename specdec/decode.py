"""`generate()`: speculative decoding as a drop-in for ``model.generate`` (batch size 1).

Each step: 1. propose a token tree  2. verify it in one target forward  3. accept a path
4. commit the path to the KV cache  5. feed the decision back to the drafter. A chain is a tree,
so there is one code path; with no drafter, an empty tree or a paused guard a step is plain
decoding. Greedy and sampled decoding differ only in the rule of step 3.

Boundary: the loop knows the `Drafter` protocol, the `Verifier`, the guard and acceptance
rules; it never imports a concrete drafter. The model's outputs stay on its device; token ids
and trees are host data (docs/device.md lists every wait on the device).
"""

from __future__ import annotations

import functools
import operator
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor
from transformers import LogitsProcessorList, StoppingCriteriaList, StopStringCriteria

from specdec import devices, memory, profile
from specdec.acceptance import AcceptanceRule, Greedy, Speculative
from specdec.drafter import Context, Drafter, Feedback, check_drafter, hidden_layers
from specdec.guard import Guard
from specdec.models import cache_dir
from specdec.packing import Packing
from specdec.sampling import sampling_processors
from specdec.trees import DEFAULT_VERIFY_COST, RunningRate, TokenTree
from specdec.verifier import Verifier


@dataclass(frozen=True)
class StepInfo:
    tree: TokenTree  # what the drafter proposed (after depth truncation)
    accepted_nodes: list[int]  # accepted path through the tree
    new_tokens: list[int]  # tokens committed this step (accepted drafts + the target's token, cut at a stop)
    draft_s: float
    verify_s: float
    overhead_s: float


@dataclass
class GenerationStats:
    """Filled in by `generate(stats=...)`; one `StepInfo` per target forward after the prefill.
    Each span ends when the model's device has finished its work (`specdec.devices.clock`), so on
    CUDA the split is where the time went, not where kernels were launched."""

    steps: list[StepInfo] = field(default_factory=list)
    prefill_s: float = 0.0
    draft_bytes: int = 0  # what the drafter holds beyond the target (its `memory_bytes`)
    peak_rss_bytes: int = 0  # the process's peak resident memory so far (`specdec.memory.peak_rss`)

    @property
    def new_tokens(self) -> int:
        return sum(len(s.new_tokens) for s in self.steps)

    @property
    def target_forwards(self) -> int:
        return len(self.steps)

    @property
    def mean_accepted(self) -> float:
        """Mean tokens committed per target forward (tau): accepted drafts + the target's own token."""
        return self.new_tokens / max(1, self.target_forwards)

    @property
    def draft_s(self) -> float:
        return sum(s.draft_s for s in self.steps)

    @property
    def verify_s(self) -> float:
        return sum(s.verify_s for s in self.steps)

    @property
    def overhead_s(self) -> float:
        return sum(s.overhead_s for s in self.steps)

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.draft_s + self.verify_s + self.overhead_s


def _as_prompt(input_ids: Tensor) -> Tensor:
    """[1, t] or [t] -> a copy [t] (never the caller's tensor), with clear errors for what this path cannot do."""
    if not isinstance(input_ids, Tensor) or input_ids.dtype not in (torch.long, torch.int32, torch.int64):
        raise TypeError("input_ids must be an integer torch.Tensor of shape [1, prompt_len]")
    if input_ids.dim() == 2:
        if input_ids.shape[0] != 1:
            raise ValueError(
                f"input_ids has batch size {input_ids.shape[0]}; specdec decodes one sequence at a time "
                "(batch size 1). Call it once per row, or use model.generate for batched decoding."
            )
        input_ids = input_ids[0]
    if input_ids.dim() != 1:
        raise ValueError(f"input_ids must have shape [1, prompt_len], got {tuple(input_ids.shape)}")
    if input_ids.numel() == 0:
        raise ValueError("input_ids is empty: give at least one prompt token (e.g. the BOS token)")
    return input_ids.to("cpu", torch.long, copy=True)


def _max_new_tokens(model, prompt: Tensor, max_new_tokens: int | None) -> int:
    """`max_new_tokens`, or the generation config's (as in HF), checked."""
    if max_new_tokens is not None:
        try:
            max_new_tokens = operator.index(max_new_tokens)
        except TypeError:
            raise TypeError(
                f"max_new_tokens must be an int, got {max_new_tokens!r} ({type(max_new_tokens).__name__}); "
                "pass e.g. max_new_tokens=int(...)"
            ) from None
    if max_new_tokens is None:
        gc = model.generation_config
        max_new_tokens = gc.max_new_tokens if gc.max_new_tokens is not None else gc.max_length - prompt.numel()
        if max_new_tokens < 1:
            raise ValueError(
                f"the prompt ({prompt.numel()} tokens) already reaches generation_config.max_length "
                f"({gc.max_length}); pass max_new_tokens=..."
            )
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1 (as in model.generate), got {max_new_tokens}")
    return max_new_tokens


_in_use: set[int] = set()  # id() of the drafters and verifiers held by running generate() calls
_in_use_lock = threading.Lock()


def _exclusive(generate_fn):
    """Decorates `generate`: holds its drafter and a passed verifier (a Session's) for the call.
    Their private state (a drafter's caches and last proposal, a verifier's cache) serves one
    sequence at a time, so a call that finds either held by another (another thread) is refused
    instead of corrupting both; they are released however the call ends."""

    @functools.wraps(generate_fn)
    def holding(model, input_ids, drafter=None, **kwargs):
        held = {id(x): x for x in (drafter, kwargs.get("verifier")) if x is not None}
        with _in_use_lock:
            busy = [x for key, x in held.items() if key in _in_use]
            if not busy:
                _in_use.update(held)
        if any(x is drafter for x in busy):
            raise RuntimeError(
                f"drafter: this {type(drafter).__name__} is in use by another generate() call right now (another "
                "thread?); a drafter's private state serves one generation at a time: give each thread its own drafter"
            )
        if busy:
            raise RuntimeError(
                "verifier: this Verifier (a specdec.Session's) is in use by another generate() call right now (another "
                "thread?); it holds one conversation's cache: give each thread its own Session"
            )
        try:
            return generate_fn(model, input_ids, drafter, **kwargs)
        finally:
            with _in_use_lock:
                _in_use.difference_update(held)

    return holding


def _check_in_vocab(tokens: Tensor, vocab: int, who: str) -> None:
    """Out-of-range ids would fail deep inside the embedding (a device assert on CUDA)."""
    if tokens.numel() and (int(tokens.max()) >= vocab or int(tokens.min()) < 0):
        raise ValueError(f"{who} token ids outside the model's vocabulary [0, {vocab})")


def _proposal(drafter: Drafter, ids: Tensor, hidden: Tensor | None, depth: int, runtime, vocab: int) -> TokenTree:
    """Step 1: the drafter's tree for a copy of the committed ids (writing into it cannot change the
    output), refused with a clear error unless it is a usable tree, cut to `depth`. `runtime`: the
    call's verify cost and `Packing`."""
    tree = drafter.propose(Context(ids.clone(), hidden, depth, runtime.verify_cost, runtime.packing, runtime.forward_s))
    who = f"{type(drafter).__name__}.propose"
    if not isinstance(tree, TokenTree):
        raise TypeError(
            f"{who} returned {'None' if tree is None else type(tree).__name__}; it must return a specdec.TokenTree: "
            "TokenTree.chain(tokens) for a sequence of tokens, TokenTree.empty() for no draft"
        )
    tree.check_unchanged()
    _check_in_vocab(tree.tokens, vocab, f"{type(drafter).__name__} proposed")
    q = tree.draft_probs
    if q is not None and tuple(q.shape) != (len(tree), vocab):
        raise ValueError(
            f"{who} returned draft_probs of shape {tuple(q.shape)} (width {q.shape[-1]}), but the target's vocabulary "
            f"has {vocab} tokens (lm_head rows): give each node's draft distribution over all of them, "
            f"[{len(tree)}, {vocab}], or draft_probs=None for a deterministic draft"
        )
    return tree.truncate(depth)


class _NoStream:
    def put(self, value) -> None:
        pass

    def end(self) -> None:
        pass


def _eos_set(model, eos_token_id) -> set[int]:
    if eos_token_id is None:
        eos_token_id = getattr(model.generation_config, "eos_token_id", None)
    if eos_token_id is None:
        return set()
    if isinstance(eos_token_id, Tensor):
        eos_token_id = eos_token_id.tolist()
    return {int(e) for e in ([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id)}


# Generation-config fields that make model.generate change greedy logits. Through the HF hook they
# arrive as `logits_processor`; a direct call with them set would silently differ, so it refuses.
_PROCESSOR_FIELDS = {
    "repetition_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0),
    "min_new_tokens": (None, 0),
    "min_length": (None, 0),
    "bad_words_ids": (None,),
    "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,),
    "sequence_bias": (None,),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
}


def _check_generation_config(model) -> None:
    gc = model.generation_config
    set_fields = [f"{k}={getattr(gc, k)!r}" for k, off in _PROCESSOR_FIELDS.items() if getattr(gc, k, None) not in off]
    if set_fields:
        raise ValueError(
            f"model.generation_config sets {', '.join(set_fields)}, which model.generate applies to the logits; "
            "pass the matching transformers processors as logits_processor=..., or call "
            "model.generate(ids, custom_generate=specdec.hf_generate, drafter=...) which builds them"
        )


def _processed(logits: Tensor, ids: Tensor, tree: TokenTree, logits_processor) -> Tensor:
    """Apply HF logits processors to every row with that row's own context (prefix + path)."""
    if not logits_processor:
        return logits
    rows = []
    for row in range(len(tree) + 1):
        path = tree.tokens[tree.path_to(row - 1)]
        context = torch.cat([ids, path]).to(logits.device)[None]  # [1, t + depth]: what model.generate saw
        rows.append(logits_processor(context, logits[row][None])[0])
    return torch.stack(rows)


def verify_cost(model, packing: Packing) -> Callable[[int], float]:
    """`Context.verify_cost` from this model's curve on this machine and device (`profile.for_model`:
    stored, else measured on first use; unmeasured: the default curve), on the forward `packing` routes."""
    prof = profile.for_model(model, cache_dir())
    if prof is None:
        return DEFAULT_VERIFY_COST
    seconds = prof.forward_cost(packing.packed_from(model))
    one = seconds(1)
    return lambda n: seconds(n + 1) / one


@dataclass(frozen=True)
class _Runtime:
    """What the runtime hands every proposal of one call beside the committed tokens."""

    verify_cost: Callable[[int], float]
    packing: Packing
    clock: RunningRate = field(default_factory=lambda: RunningRate(0.0, 1e-9, decay=0.9))  # seconds per root forward

    @property
    def forward_s(self) -> float | None:
        return self.clock.rate if self.clock.hits > 0 else None


@dataclass(frozen=True)
class _Options:
    """`generate`'s arguments checked and resolved (`_resolve`): what the loop reads."""

    prompt: Tensor  # [t] a host copy of input_ids
    max_new_tokens: int
    vocab: int  # the target's lm_head rows
    eos: frozenset[int]
    logits_processor: LogitsProcessorList | None  # with do_sample, the sampling warpers after the caller's
    rule: AcceptanceRule
    guard: Guard | None  # begun for this call


def _resolve(model, input_ids, drafter, max_new_tokens, eos_token_id, logits_processor, rule, guard,
             do_sample, temperature, top_k, top_p, min_p, seed) -> _Options:
    """Every argument check `generate` makes before any work, and the options they resolve to."""
    prompt = _as_prompt(input_ids)
    if drafter is not None:
        check_drafter(drafter)
    max_new_tokens = _max_new_tokens(model, prompt, max_new_tokens)
    vocab = model.get_output_embeddings().out_features
    _check_in_vocab(prompt, vocab, "input_ids holds")
    if logits_processor is None:
        _check_generation_config(model)
    if do_sample is None:
        do_sample = bool(model.generation_config.do_sample)
    if do_sample:
        warpers = sampling_processors(model, temperature, top_k, top_p, min_p)
        logits_processor = LogitsProcessorList([*(logits_processor or []), *warpers])  # HF's order
        rule = rule or Speculative(seed)
    elif any(v is not None for v in (temperature, top_k, top_p, min_p, seed)):
        raise ValueError("temperature, top_k, top_p, min_p and seed apply only with do_sample=True (as in "
                         "model.generate)")
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and prompt.numel() > limit:
        raise ValueError(
            f"the prompt has {prompt.numel()} tokens but the model allows at most {limit} "
            "(config.max_position_embeddings); shorten the prompt"
        )
    eos = frozenset(_eos_set(model, eos_token_id))
    guard = Guard() if guard is True else (guard or None)
    if guard is not None:
        guard.begin()
    return _Options(prompt, max_new_tokens, vocab, eos, logits_processor, rule or Greedy(), guard)


def _verifier(model, drafter: Drafter | None, verifier: Verifier | None, packed_from: int | None) -> Verifier:
    """The drafter begun on the target, and the verifier for this call: a new one, or the passed
    one (a Session's) set up for it with its cache kept."""
    if drafter is not None:
        drafter.begin(model)
    keep_hidden = drafter is not None and drafter.needs_hidden_states
    layers = hidden_layers(drafter)  # HF hidden-state indices it reads
    if verifier is None:
        return Verifier(model, keep_hidden_states=keep_hidden, packed_from=packed_from, hidden_layers=layers)
    if verifier.model is not model:
        raise ValueError("verifier: it was built for another model; pass a Verifier(model) of this target")
    verifier.configure(keep_hidden_states=keep_hidden, packed_from=packed_from, hidden_layers=layers)
    return verifier


def _emitted(new: list[int], path: list[int], ids: Tensor, logits: Tensor, remaining: int, eos, stopping_criteria):
    """The stop scan: the step's tokens up to where ``model.generate`` would stop (an EOS, the
    stopping criteria checked after every single token, the token budget), and whether it stops."""
    emitted: list[int] = []
    for j, tok in enumerate(new[:remaining]):
        emitted.append(tok)
        if tok in eos:
            return emitted, True
        if stopping_criteria is not None:
            row = 0 if j == 0 else path[j - 1] + 1  # the logits row that predicted this token
            seq = torch.cat([ids, torch.tensor(emitted)]).to(logits.device)[None]
            if bool(stopping_criteria(seq, logits[row][None]).all()):
                return emitted, True
    return emitted, len(emitted) == remaining


def _feedback(drafter: Drafter | None, scores, tree: TokenTree, path: list[int], new: list[int], logits: Tensor):
    """Step 5: the drafter learns the decision (`feedback_topk` rows of the target's top tokens if
    it asks); returns the committed tokens' hidden states for its next proposal (or None)."""
    if drafter is not None:
        k = getattr(drafter, "feedback_topk", 0)
        top = logits.topk(k, dim=-1).indices.cpu() if k else None  # [n + 1, k]
        drafter.update(Feedback(tree, path, torch.tensor(new), top))
    return None if scores.hidden_states is None else scores.hidden_states[[0] + [i + 1 for i in path]]


def _finish(stream, stats, drafter: Drafter | None) -> None:
    """After the last step: end the stream; the drafter's memory and the process's peak, once per call."""
    stream.end()
    stats.draft_bytes = int(getattr(drafter, "memory_bytes", 0) or 0)
    stats.peak_rss_bytes = memory.peak_rss()


def _record(step: StepInfo, asked: bool, drafter: Drafter | None, guard: Guard | None, stats, on_step,
            runtime: _Runtime | None) -> None:
    """After every step: `stats`, the guard, `on_step`, the runtime's forward clock. A step the
    drafter was asked for counts as speculative even when it proposed nothing: its drafting time is
    part of what speculation costs."""
    stats.steps.append(step)
    if runtime is not None:
        runtime.clock.add(step.verify_s, runtime.verify_cost(len(step.tree)))
    if guard is not None and drafter is not None:
        guard.record(asked, len(step.new_tokens), step.draft_s + step.verify_s + step.overhead_s)
    if on_step is not None:
        on_step(step)


@_exclusive
@torch.no_grad()
def generate(
    model, input_ids: Tensor, drafter: Drafter | None = None, *, max_new_tokens: int | None = None,
    eos_token_id: int | list[int] | None = None, streamer=None, stopping_criteria=None, logits_processor=None,
    rule: AcceptanceRule | None = None, stats: GenerationStats | None = None, on_step=None,
    packed_from: int | None | str = "auto", do_sample: bool | None = None, temperature: float | None = None,
    top_k: int | None = None, top_p: float | None = None, min_p: float | None = None, seed: int | None = None,
    guard: Guard | bool | None = True, verifier: Verifier | None = None,
) -> Tensor:
    """Speculative decoding with the output of ``model.generate``. Returns ``[1, prompt + new]``.

    Greedy (the default): token for token what ``model.generate(do_sample=False)`` returns. ``do_sample`` (None:
    the generation config's) samples with `temperature`, `top_k`, `top_p`, `min_p` as HF does, through the
    lossless `Speculative` rule (output distributed exactly as sampling the target); `seed` makes it
    reproducible whatever was drafted (None: torch's global RNG). `rule` overrides the rule (e.g. the lossy
    `specdec.Typical`). A first call with no stored profile measures one (SPECDEC_TUNE=0: not). `guard`: True a
    fresh no-slowdown `specdec.Guard`, a `Guard` keeps its measurements across calls, None/False drafts every
    step. `verifier`: a `Verifier` of this model whose cached common prefix is reused (`specdec.Session`).
    `max_new_tokens`, `eos_token_id` default as in HF (``eos_token_id=[]``: no EOS); `stopping_criteria`
    (checked after every token) and `logits_processor` are transformers' lists. `on_step(StepInfo)` runs after
    every target forward; `stats` collects the same. `packed_from`: forwards (the drafter's too) over >= this
    many tokens run packed (`specdec.packing.Packing`; "auto": each model's crossover; None: never).
    """
    packing = profile.packing(packed_from, cache_dir())  # the runtime decides packing, drafters take routes
    o = _resolve(model, input_ids, drafter, max_new_tokens, eos_token_id, logits_processor, rule, guard,
                 do_sample, temperature, top_k, top_p, min_p, seed)
    stats = stats if stats is not None else GenerationStats()
    stream = streamer if streamer is not None else _NoStream()
    verifier = _verifier(model, drafter, verifier, packing.packed_from(model))  # the drafter refuses first
    runtime = _Runtime(verify_cost(model, packing), packing) if drafter is not None else None  # may measure: untimed
    stream.put(o.prompt[None])
    device, t0 = model.device, devices.clock(model.device)
    hidden, ids, done = verifier.prefill(o.prompt), o.prompt, False
    stats.prefill_s = devices.clock(device) - t0
    while not done:
        remaining, t0 = o.max_new_tokens - (ids.numel() - o.prompt.numel()), devices.clock(device)
        # 1. Propose a tree under the root (the last committed token), no deeper than the budget.
        asked = drafter is not None and remaining > 1 and (o.guard is None or o.guard.speculate())
        tree = _proposal(drafter, ids, hidden, remaining - 1, runtime, o.vocab) if asked else TokenTree.empty()
        t1 = devices.clock(device)
        # 2. Verify: one target forward over [root] + tree; logits [n + 1, vocab] in fp32 as in HF.
        scores = verifier.score(int(ids[-1]), tree)
        logits = _processed(scores.logits.float(), ids, tree, o.logits_processor)
        t2 = devices.clock(device)
        # 3. Accept the longest path the target agrees with, plus its own next token; stop where HF would.
        decision = o.rule(tree, logits, position=ids.numel())  # row 0 predicts token ids.numel()
        path, new = decision.accepted_nodes, tree.tokens[decision.accepted_nodes].tolist() + [decision.next_token]
        emitted, done = _emitted(new, path, ids, logits, remaining, o.eos, stopping_criteria)
        ids = torch.cat([ids, torch.tensor(emitted, dtype=torch.long)])
        stream.put(ids[-len(emitted):])
        # 4. Commit prefix + root + the emitted path to the cache (after the last step too: a Session's next turn).
        verifier.commit(path[: len(emitted) - 1])
        if len(emitted) == len(new):  # 5. Feedback, unless a stop cut the path short
            hidden = _feedback(drafter, scores, tree, path, new, logits)
        step = StepInfo(tree, path, emitted, t1 - t0, t2 - t1, devices.clock(device) - t2)
        _record(step, asked, drafter, o.guard, stats, on_step, runtime)
    _finish(stream, stats, drafter)
    return ids[None].to(input_ids.device)


def _withheld_from_hook() -> dict:
    """`streamer`, `assistant_model` and `tokenizer` as the caller passed them to ``model.generate``.

    transformers (5.25, `_extract_generation_mode_kwargs`) hands a custom_generate callable only
    the keywords its signature adds to `_sample`'s and drops these three, so they are read from
    the ``model.generate`` frame that called `hf_generate` (its named arguments) and from its
    decorators' frames (the caller's keywords, `tokenizer` still among them). Called directly,
    outside transformers, it finds nothing."""
    frame = sys._getframe(2)  # 0: here, 1: hf_generate, 2: its caller
    if frame.f_code.co_name != "generate" or not frame.f_globals.get("__name__", "").startswith("transformers."):
        return {}
    found = {name: frame.f_locals.get(name) for name in ("streamer", "assistant_model")}
    while frame is not None and frame.f_globals.get("__name__", "").partition(".")[0] in ("transformers", "torch"):
        found["tokenizer"] = (frame.f_locals.get("kwargs") or {}).get("tokenizer")
        if found["tokenizer"] is not None:
            break
        frame = frame.f_back
    return found


class _PromptAlreadySent:
    """A streamer that model.generate already gave the prompt: `generate`'s own put of it is dropped."""

    def __init__(self, streamer):
        self.streamer, self.prompt_pending = streamer, True

    def put(self, value) -> None:
        if self.prompt_pending:
            self.prompt_pending = False
        else:
            self.streamer.put(value)

    def end(self) -> None:
        self.streamer.end()


def hf_generate(
    model,
    input_ids: Tensor,
    logits_processor=None,
    stopping_criteria=None,
    generation_config=None,
    synced_gpus: bool = False,
    streamer=None,
    drafter: Drafter | None = None,
    stop_strings: str | list[str] | None = None,
    specdec_streamer=None,
    specdec_stats: GenerationStats | None = None,
    **model_kwargs,
) -> Tensor:
    """``model.generate(ids, custom_generate=specdec.hf_generate, drafter=...)``.

    transformers prepares the generation config, logits processors and stopping criteria
    (max length, EOS) and hands them here; with ``do_sample=True`` its processors already hold
    the sampling warpers and the lossless `Speculative` rule samples. It withholds `tokenizer`,
    `streamer` and `assistant_model` from custom loops (`_withheld_from_hook` finds them), and
    `stop_strings` is taken here so that transformers does not refuse them for want of the
    tokenizer: both then work as with ``model.generate`` (stop strings set in a
    `GenerationConfig` still meet transformers' own refusal: pass them as ``stop_strings=``).
    `assistant_model` (transformers' own assisted decoding) is refused: pass a drafter.
    """
    if generation_config is not None and generation_config.num_beams not in (None, 1):
        raise ValueError("specdec.hf_generate does not do beam search: pass num_beams=1")
    withheld = _withheld_from_hook()
    if withheld.get("assistant_model") is not None:
        raise ValueError(
            "specdec.hf_generate: assistant_model is transformers' assisted decoding, which specdec replaces; "
            "pass drafter=... instead (specdec.drafters has a draft-model drafter that takes the assistant)"
        )
    if stop_strings is not None:
        if withheld.get("tokenizer") is None:
            raise ValueError("specdec.hf_generate: stop_strings need the model's tokenizer: pass tokenizer=... too")
        stops = [stop_strings] if isinstance(stop_strings, str) else stop_strings
        stop = StopStringCriteria(withheld["tokenizer"], stops)
        stopping_criteria = StoppingCriteriaList([*(stopping_criteria or []), stop])
    if streamer is None and withheld.get("streamer") is not None:
        streamer = _PromptAlreadySent(withheld["streamer"])
    sampling = bool(generation_config.do_sample) if generation_config is not None else False
    mask = model_kwargs.get("attention_mask")
    if mask is not None and not bool(mask.all()):
        raise ValueError("specdec.hf_generate got a padded attention_mask; pass the unpadded prompt (batch size 1)")
    max_length = generation_config.max_length if generation_config is not None else model.generation_config.max_length
    return generate(
        model,
        input_ids,
        drafter,
        max_new_tokens=max_length - input_ids.shape[-1],
        eos_token_id=[],  # transformers already put its EOS criterion into stopping_criteria
        streamer=specdec_streamer if specdec_streamer is not None else streamer,
        stopping_criteria=stopping_criteria,
        logits_processor=logits_processor,  # with do_sample, transformers already put the warpers in
        stats=specdec_stats,
        do_sample=False,
        rule=Speculative() if sampling else None,
    )
