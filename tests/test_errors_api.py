"""Hard edges of the API (issue 20): a drafter that misbehaves or is misused gets a clear error or
cannot change the output, and nothing a caller passes in is written to."""

import threading

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

import specdec
from conftest import VOCAB, random_prompt, reference, tiny_model
from specdec.drafters import LayerSkip, PromptLookup
from specdec.trees import TokenTree


class Scribbler(PromptLookup):
    """A buggy drafter: it writes into ``ctx.input_ids`` before proposing."""

    def propose(self, ctx):
        ctx.input_ids.add_(1).remainder_(VOCAB - 1)
        return super().propose(ctx)


def test_a_drafter_writing_into_its_context_changes_neither_output_nor_prompt():
    model = tiny_model()
    prompt = random_prompt(0, 16)
    before = prompt.clone()
    out = specdec.generate(model, prompt, Scribbler(min_ngram=1), max_new_tokens=12, eos_token_id=[], guard=None)
    assert torch.equal(prompt, before)
    assert torch.equal(out, reference(model, before, 12))


class BanAllAt(LogitsProcessor):
    """Bans every token for the row whose context has `length` tokens (a processor that overreaches)."""

    def __init__(self, length: int):
        self.length = length

    def __call__(self, input_ids, scores):
        return torch.full_like(scores, float("-inf")) if input_ids.shape[-1] == self.length else scores


@pytest.mark.parametrize("seed", [None, 5])
@pytest.mark.parametrize("with_drafter", [False, True])
def test_sampling_a_row_that_bans_every_token_raises_one_clear_error(seed, with_drafter):
    model = tiny_model()
    prompt = random_prompt(0, 16)
    procs = LogitsProcessorList([BanAllAt(prompt.shape[1] + 3)])  # the 4th new token has nothing left
    drafter = PromptLookup(min_ngram=1) if with_drafter else None
    with pytest.raises(ValueError, match="logits_processor"):
        specdec.generate(model, prompt, drafter, max_new_tokens=8, eos_token_id=[], do_sample=True, seed=seed,
                         logits_processor=procs, guard=None)


def test_greedy_over_a_row_that_bans_every_token_answers_like_generate():
    model = tiny_model()
    prompt = random_prompt(0, 16)
    procs = LogitsProcessorList([BanAllAt(prompt.shape[1] + 3)])
    out = specdec.generate(
        model, prompt, PromptLookup(min_ngram=1), max_new_tokens=8, eos_token_id=[], logits_processor=procs
    )
    assert torch.equal(out, reference(model, prompt, 8, logits_processor=procs))


class BanAfter(LogitsProcessor):
    """A grammar that never allows token `x` and allows nothing after it."""

    def __init__(self, x: int):
        self.x = x

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        scores[:, self.x] = float("-inf")
        return torch.full_like(scores, float("-inf")) if int(input_ids[0, -1]) == self.x else scores


class ProposesBanned:
    """Always drafts the banned token and a child under it: their rows are never sampled from."""

    needs_hidden_states = False

    def begin(self, target):
        pass

    def propose(self, ctx):
        return TokenTree(torch.tensor([7, 3]), torch.tensor([-1, 0]))

    def update(self, feedback):
        pass


@pytest.mark.parametrize("seed", [None, 5])
def test_rows_that_are_never_sampled_may_ban_everything(seed):
    model = tiny_model()
    prompt = random_prompt(0, 16)
    procs = LogitsProcessorList([BanAfter(7)])
    kwargs = dict(max_new_tokens=10, eos_token_id=[], do_sample=True, seed=seed, logits_processor=procs, guard=None)
    out = specdec.generate(model, prompt, ProposesBanned(), **kwargs)
    assert 7 not in out[0, prompt.shape[1] :].tolist()
    if seed is not None:  # a seeded sample does not depend on what was drafted
        assert torch.equal(out, specdec.generate(model, prompt, None, **kwargs))


class Paused:
    """Calls `then` once, from the thread that first gets here, after pausing until released."""

    def __init__(self):
        self.entered, self.release, self.first = threading.Event(), threading.Event(), None

    def __call__(self):
        if self.first is None:
            self.first = threading.get_ident()
            self.entered.set()
            assert self.release.wait(60)


class PausingLayerSkip(LayerSkip):
    def __init__(self, model, pause, **kwargs):
        super().__init__(model, **kwargs)
        self.pause = pause

    def propose(self, ctx):
        self.pause()
        return super().propose(ctx)


class PausingStreamer:
    def __init__(self, pause):
        self.pause, self.puts = pause, 0

    def put(self, value):
        self.puts += 1
        if self.puts == 2:  # after the prompt and the prefill
            self.pause()

    def end(self):
        pass


def in_thread(fn):
    """Runs `fn` in a thread; returns the thread and a dict that will hold its result or error."""
    box = {}

    def target():
        try:
            box["out"] = fn()
        except BaseException as err:  # handed back to the test
            box["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, box


def generation_meets_a_second_one(start_first, second):
    """Starts the first generation, and while it is paused mid-way runs `second` in this thread:
    returns (what `second` raised or None, the first's output)."""
    pause = Paused()
    thread, box = in_thread(lambda: start_first(pause))
    assert pause.entered.wait(60)
    try:
        second()
        raised = None
    except RuntimeError as err:
        raised = err
    finally:
        pause.release.set()
        thread.join(60)
    if "error" in box:
        raise box["error"]
    return raised, box["out"]


def test_a_drafter_or_session_in_use_by_another_thread_is_refused():
    model = tiny_model(layers=4)
    prompt = random_prompt(0, 16)
    kwargs = dict(max_new_tokens=12, eos_token_id=[], guard=None)
    shared = {}

    def first(pause):
        shared["drafter"] = PausingLayerSkip(model, pause, skip=[1])
        return specdec.generate(model, prompt, shared["drafter"], **kwargs)

    raised, out = generation_meets_a_second_one(
        first, lambda: specdec.generate(model, prompt, shared["drafter"], **kwargs)
    )
    assert raised is not None and "drafter" in str(raised) and "another" in str(raised)
    assert torch.equal(out, reference(model, prompt, 12))  # the first one was not disturbed
    assert torch.equal(specdec.generate(model, prompt, shared["drafter"], **kwargs), out)  # free again afterwards

    session = specdec.Session(model, **kwargs)
    raised, out = generation_meets_a_second_one(lambda pause: session.generate(prompt, streamer=PausingStreamer(pause)),
                                                lambda: session.generate(prompt))
    assert raised is not None and "Session" in str(raised)
    assert torch.equal(out, reference(model, prompt, 12)) and torch.equal(session.generate(prompt), out)


class Returns:
    """A drafter whose propose returns `make()`."""

    needs_hidden_states = False

    def __init__(self, make):
        self.make = make

    def begin(self, target):
        pass

    def propose(self, ctx):
        return self.make()

    def update(self, feedback):
        pass


def written_after_building(field: str):
    def make():
        tree = TokenTree(torch.tensor([5, 6, 7]), torch.tensor([-1, 0, 1]))
        tree.children(-1)  # the structure is derived and cached from parents
        getattr(tree, field)[2] = 0  # a chain turned into siblings, or another token, in place
        return tree

    return make


MISUSE = {
    "max_new_tokens float": (dict(max_new_tokens=5.0), TypeError, r"max_new_tokens.*int"),
    "max_new_tokens str": (dict(max_new_tokens="5"), TypeError, r"max_new_tokens.*int"),
    "propose returns None": (dict(drafter=Returns(lambda: None)), TypeError, r"propose returned None.*TokenTree"),
    "propose returns a list": (dict(drafter=Returns(lambda: [5, 6])), TypeError, r"propose returned "
                                                                                 r"list.*TokenTree\.chain"),
    "tree parents written": (dict(drafter=Returns(written_after_building("parents"))), ValueError, r"TokenTree.*in "
                                                                                                   r"place"),
    "tree tokens written": (dict(drafter=Returns(written_after_building("tokens"))), ValueError, r"TokenTree.*in "
                                                                                                 r"place"),
    "draft_probs too narrow": (
        dict(drafter=Returns(lambda: TokenTree.chain([5, 6], draft_probs=torch.full((2, 10), 0.1))), do_sample=True),
        ValueError, rf"draft_probs.*width 10.*{VOCAB}",
    ),
    "drafter class": (dict(drafter=PromptLookup), TypeError, r"drafter.*class PromptLookup.*PromptLookup\(\)"),
    "drafter name": (dict(drafter="prompt-lookup"), TypeError, r"drafter.*'prompt-lookup'.*make_drafter"),
    "not a drafter": (dict(drafter=object()), TypeError, r"drafter: object has no needs_hidden_states, "
                                                         r"begin.*specdec\.Drafter"),
}


@pytest.mark.parametrize("case", MISUSE)
def test_api_misuse_gets_an_error_naming_the_argument_and_the_fix(case):
    kwargs, error, message = MISUSE[case]
    kwargs = {"drafter": None, "max_new_tokens": 6, "eos_token_id": [], "guard": None, **kwargs}
    with pytest.raises(error, match=message):
        specdec.generate(tiny_model(), random_prompt(0, 8), kwargs.pop("drafter"), **kwargs)
