"""The only module that touches transformers' cache internals.

After the verifier scores ``[root] + tree``, the cache holds prefix + root + every tree node; the
committed state is prefix + root + the accepted path. When transformers changes its cache
classes, this file is the one to change.

Checked on transformers 5.23: ``DynamicCache.crop(-n)`` drops n slots, ``crop(0)`` is a no-op
(on 5.0 it emptied the cache) and a positive argument raises, so `crop` is called only with
n > 0 slots to drop.
"""

from __future__ import annotations

import functools
import inspect

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer


@functools.lru_cache(maxsize=None)
def _cache_argument(model_class: type) -> str:
    params = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(model, cache: Cache) -> dict:
    """The forward's cache argument: transformers 5.24 renamed ``past_key_values`` to ``cache``
    (the old name warns and goes away in 5.40); earlier 5.x releases only know the old one."""
    return {_cache_argument(type(model)): cache}


def new_cache(model) -> DynamicCache:
    """An empty cache whose layer types come from the config, so support is checked up front."""
    cache = DynamicCache(config=model.config)
    check_full_attention(cache)
    return cache


def check_full_attention(cache: Cache) -> None:
    """Tree compaction assumes every layer keeps every slot (no sliding window, no linear state)."""
    for i, layer in enumerate(cache.layers):
        if type(layer) is not DynamicLayer:
            raise ValueError(
                f"specdec needs full-attention KV caches; layer {i} uses {type(layer).__name__}. "
                "Sliding-window and linear-attention models are not supported yet."
            )


def states(cache: Cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's (keys, values), [batch, kv heads, slots, head dim]."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def length(cache: Cache, layer: int = 0) -> int:
    """Slots held by decoder layer `layer`. A cache filled by running only some of the model's
    layers (self-speculative drafters) leaves the others empty, so those ask for a filled one."""
    return cache.get_seq_length(layer)


def drop_last(cache: Cache, n: int) -> None:
    """Forget the last n slots (n >= 0)."""
    if n > 0:
        cache.crop(-n)


def truncate(cache: Cache, n: int) -> int:
    """Cut every filled layer to its first n slots; returns the slots they all hold now: n, or
    fewer when a forward cut off part-way (an exception, Ctrl-C) left the later layers shorter.
    The caller feeds again from there."""
    filled = [layer for layer in cache.layers if layer.is_initialized]
    n = min([n] + [layer.get_seq_length() for layer in filled])
    for layer in filled:
        if layer.get_seq_length() > n:
            layer.crop(n - layer.get_seq_length())
    return n


def keep(cache: Cache, n_prefix: int, slots: list[int]) -> None:
    """Keep slots [0, n_prefix) plus `slots` (ascending, each >= n_prefix); drop everything else."""
    total = length(cache)
    if slots == list(range(n_prefix, n_prefix + len(slots))):  # a chain's accepted path: just crop
        drop_last(cache, total - n_prefix - len(slots))
        return
    index = torch.tensor(list(range(n_prefix)) + slots, dtype=torch.long)
    on: dict[torch.device, torch.Tensor] = {}  # the index copied once per device, not once per layer
    for layer in cache.layers:
        if layer.is_initialized:
            device = layer.keys.device
            if device not in on:
                on[device] = index.to(device)
            layer.keys = layer.keys.index_select(-2, on[device])
            layer.values = layer.values.index_select(-2, on[device])
