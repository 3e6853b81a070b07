"""Tiny random models built in-process (no downloads), float64 so argmax near-ties cannot flip
between a batched tree forward and an incremental one; the helpers drafter tests share (a greedy
speculative run with its stats, the check that a drafter leaves the target as it found it); the
`device` fixture: "cpu" always, "cuda" where torch sees a GPU (skipped, with the reason, where not)."""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch

import specdec

VOCAB = 96

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason=f"no CUDA GPU visible to torch {torch.__version__}: the CUDA half of this test did not run")),
]


@pytest.fixture(scope="session", autouse=True)
def no_first_use_tuning():
    """`generate` would measure a cost curve the first time it meets each tiny model (SPECDEC_TUNE
    opts out); a test of that behaviour sets it back (monkeypatch)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPECDEC_TUNE", "0")
        yield


@pytest.fixture(scope="session", params=DEVICES)
def device(request) -> torch.device:
    """Each test that takes it runs once per device (session-scoped, so hypothesis accepts it)."""
    return torch.device(request.param)


@functools.lru_cache(maxsize=None)
def _build(arch: str, seed: int, attn: str, layers: int, vocab: int, device: str = "cpu"):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA on purpose
        max_position_embeddings=256,
        eos_token_id=None,
        bos_token_id=None,
        pad_token_id=None,
        attn_implementation=attn,
    )
    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = vocab - 1
    return model.eval().double().to(device)  # built on the CPU: the same weights on every device


def tiny_model(arch: str = "llama", seed: int = 0, attn: str = "sdpa", layers: int = 2, vocab: int = VOCAB,
               device: torch.device | str = "cpu"):
    """Cached per arguments: tests must not mutate the returned model."""
    return _build(arch, seed, attn, layers, vocab, str(torch.device(device)))


def reference(model, prompt: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
    """Plain greedy `model.generate`: the output every speculative run must reproduce."""
    kwargs.setdefault("eos_token_id", None)
    prompt = prompt.to(model.device)
    return model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=max_new_tokens,
        min_new_tokens=0,
        do_sample=False,
        pad_token_id=model.config.vocab_size - 1,  # never in prompts: HF would infer padding from it
        **kwargs,
    )


def random_prompt(seed: int, length: int, vocab: int = VOCAB) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab - 1, (1, length), generator=g)


def repetitive(seed: int) -> torch.Tensor:
    """[1, 21]: 8 random tokens, their first 5, then the 8 again, so drafters that look up what
    followed earlier n-grams find continuations."""
    base = random_prompt(seed, 8)
    return torch.cat([base, base[:, :5], base], dim=1)


@pytest.fixture
def llama():
    return tiny_model("llama")


@pytest.fixture
def free_verify(monkeypatch):
    """A stored cost curve that prices verification as free (flat to 64 nodes), so drafters that
    size their trees by `Context.verify_cost` keep every node they propose."""
    from specdec import profile

    flat = profile.Profile(profile.CostCurve("any", "stock", (1, 64), (1.0, 1.0), 300, 1, "test"), None)
    monkeypatch.setattr(profile, "stored", lambda model, cache_dir: flat)


def run(model, prompt: torch.Tensor, drafter, max_new: int, **kwargs):
    """Greedy `specdec.generate` with no EOS and, unless `guard` is given, no guard (so every step
    drafts): (output [1, t + max_new], its `GenerationStats`)."""
    stats = specdec.GenerationStats()
    kwargs.setdefault("guard", None)
    out = specdec.generate(model, prompt, drafter, max_new_tokens=max_new, eos_token_id=[], stats=stats, **kwargs)
    return out, stats


def assert_drafts_within(model, drafter, vocab: torch.Tensor, requests: int = 3) -> None:
    """One drafter over `requests` prompts: every output exact, every drafted token in `vocab` (a
    draft vocabulary) or in that request's context so far, and some drafted from the context."""
    outside = set()
    for seed in range(requests):
        prompt = random_prompt(seed, 6)
        out, stats = run(model, prompt, drafter, 30)
        assert torch.equal(out, reference(model, prompt, 30))
        t = prompt.shape[1]
        for step in stats.steps:
            drafted = set(step.tree.tokens.tolist())
            assert drafted <= set(vocab.tolist()) | set(out[0, :t].tolist())
            outside |= drafted - set(vocab.tolist())
            t += len(step.new_tokens)
    assert outside  # context tokens were drafted


@contextlib.contextmanager
def leaves_untouched(model):
    """Asserts, after the block, that it changed none of `model`'s weights, its config, or the
    attribute names of any of its modules (drafters may not set attributes on the target)."""
    params = {k: v.clone() for k, v in model.state_dict().items()}
    config = model.config.to_dict()
    attrs = {name: sorted(vars(m)) for name, m in model.named_modules()}
    yield
    assert model.config.to_dict() == config
    assert {name: sorted(vars(m)) for name, m in model.named_modules()} == attrs
    for k, v in model.state_dict().items():
        assert torch.equal(v, params[k]), k
