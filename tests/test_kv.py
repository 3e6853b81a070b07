"""KV invariant: after score + commit the cache equals a fresh cache fed the committed tokens
(on every device of the `device` fixture; token ids stay on the host, as the verifier keeps them)."""

import pytest
import torch
from transformers import DynamicCache

from conftest import random_prompt, tiny_model
from specdec import kv
from specdec.trees import TokenTree
from specdec.verifier import Verifier


def fresh_cache(model, tokens):
    cache = DynamicCache(config=model.config)
    model(input_ids=tokens[None].to(model.device), **kv.cache_kwargs(model, cache), use_cache=True)
    return cache


def assert_same(a, b):
    assert len(a.layers) == len(b.layers)
    for la, lb in zip(a.layers, b.layers):
        assert la.keys.shape == lb.keys.shape
        torch.testing.assert_close(la.keys, lb.keys, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(la.values, lb.values, rtol=1e-9, atol=1e-9)


TREES = {
    "chain": lambda: TokenTree.chain(torch.tensor([5, 6, 7, 8])),
    "siblings": lambda: TokenTree(torch.tensor([5, 9, 6, 7, 3]), torch.tensor([-1, -1, 1, 2, 0])),
    "empty": TokenTree.empty,
}


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("shape", list(TREES))
def test_commit_matches_fresh_cache(shape, attn, device):
    model = tiny_model("llama", attn=attn, device=device)
    tree = TREES[shape]()
    prompt = random_prompt(2, 6)[0]
    for node in [-1, *range(len(tree))]:  # accept the path to every node in turn
        verifier = Verifier(model)
        verifier.prefill(prompt)
        verifier.score(int(prompt[-1]), tree)
        path = tree.path_to(node)
        verifier.commit(path)
        committed = torch.cat([prompt, tree.tokens[path]])
        assert verifier.prefix_len == committed.numel() == kv.length(verifier.cache)
        assert all(layer.keys.device == model.device for layer in verifier.cache.layers)
        assert_same(verifier.cache, fresh_cache(model, committed))


def test_scores_match_plain_forwards(device):
    """Every tree row's logits equal a plain causal forward over the path to that node."""
    model = tiny_model("qwen", attn="sdpa", device=device)
    tree = TREES["siblings"]()
    prompt = random_prompt(5, 6)[0]
    verifier = Verifier(model)
    verifier.prefill(prompt)
    logits = verifier.score(int(prompt[-1]), tree).logits
    assert logits.device == model.device
    for node in [-1, *range(len(tree))]:
        seq = torch.cat([prompt, tree.tokens[tree.path_to(node)]])
        expected = model(input_ids=seq[None].to(device)).logits[0, -1]
        torch.testing.assert_close(logits[node + 1], expected, rtol=1e-9, atol=1e-9)


def test_crop_semantics_on_installed_transformers(device):
    """kv.drop_last relies on crop(-n) dropping n slots and never calls crop(0) (it empties the
    cache on transformers 5.0 and is a no-op on 5.23)."""
    model = tiny_model("llama", device=device)
    cache = fresh_cache(model, torch.arange(10))
    cache.crop(-3)
    assert kv.length(cache) == 7
    kv.drop_last(cache, 0)
    assert kv.length(cache) == 7
    before = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
    kv.keep(cache, 2, [3, 5])
    assert kv.length(cache) == 4
    for (keys, values), layer in zip(before, cache.layers):
        assert torch.equal(layer.keys, keys[..., [0, 1, 3, 5], :])
        assert torch.equal(layer.values, values[..., [0, 1, 3, 5], :])


def test_sliding_window_cache_is_refused():
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=4,
    )
    model = MistralForCausalLM(config).eval()
    with pytest.raises(ValueError, match="full-attention"):
        Verifier(model)
