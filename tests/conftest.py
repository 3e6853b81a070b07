"""Tiny random models built in-process (no downloads), float64 so argmax near-ties cannot flip
between a batched tree forward and an incremental one."""

from __future__ import annotations

import functools

import pytest
import torch

VOCAB = 96


@functools.lru_cache(maxsize=None)
def _build(arch: str, seed: int, attn: str, layers: int, vocab: int):
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
    return model.eval().double()


def tiny_model(arch: str = "llama", seed: int = 0, attn: str = "sdpa", layers: int = 2, vocab: int = VOCAB):
    """Cached per arguments: tests must not mutate the returned model."""
    return _build(arch, seed, attn, layers, vocab)


def reference(model, prompt: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
    """Plain greedy `model.generate`: the output every speculative run must reproduce."""
    kwargs.setdefault("eos_token_id", None)
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


@pytest.fixture
def llama():
    return tiny_model("llama")
