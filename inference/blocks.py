"""Blocks ⇄ DynamicCache: which keys a prompt has, loading its longest cached prefix, exporting new blocks.

The loader (``inference.loader``) reads the stored prefix; a record that does not fit (dtype,
shape, layer), fails its checksum or is missing ends the reuse at its block: the prefix before it
is used, the rest is prefilled, and the reason is counted.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache
from transformers.cache_utils import get_layer_types_and_kwargs

from kvproto.keys import block_keys, record_key, tail_key
from kvproto.record import prefix_length

from .codec import encode
from .kvbuffers import KVBuffers


@dataclass(frozen=True)
class KVLayout:
    """What one token's KV looks like for a model: layers x [kv_heads, head_dim] of `dtype`."""

    num_layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device

    @classmethod
    def of(cls, model: torch.nn.Module) -> "KVLayout":
        config = model.config.get_text_config(decoder=True)
        layer_types, _ = get_layer_types_and_kwargs(config)
        if any(t != "full_attention" for t in layer_types):
            raise ValueError(f"KV reuse needs full-attention layers only, the model has {sorted(set(layer_types))}")
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        return cls(len(layer_types), kv_heads, head_dim, model.dtype, next(model.parameters()).device)

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.kv_heads * self.head_dim * torch.empty((), dtype=self.dtype).element_size()


@dataclass(frozen=True)
class PrefixPlan:
    """The keys of a prompt: one per full block, and one for the shorter tail (if any)."""

    block_size: int
    block_keys: list[bytes]
    tail_key: bytes | None
    tail_tokens: int

    @property
    def num_tokens(self) -> int:
        return len(self.block_keys) * self.block_size + self.tail_tokens

    def segments(self) -> list[tuple[bytes, int, int]]:
        """(key, first token, token count) of every block, the tail last."""
        out = [(key, i * self.block_size, self.block_size) for i, key in enumerate(self.block_keys)]
        if self.tail_key is not None:
            out.append((self.tail_key, len(self.block_keys) * self.block_size, self.tail_tokens))
        return out


def plan_prefix(namespace: bytes, tokens: Sequence[int], block_size: int) -> PrefixPlan:
    keys = block_keys(namespace, tokens, block_size)
    rest = list(tokens[len(keys) * block_size :])
    tail = tail_key(keys[-1] if keys else namespace, rest) if rest else None
    return PrefixPlan(block_size, keys, tail, len(rest))


@dataclass
class LoadedPrefix:
    cache: DynamicCache  # of ReservedLayers over `buffers`
    tokens: int  # tokens of KV in `cache`
    blocks: int  # full blocks that loaded
    tail: bool  # whether the tail loaded too
    bytes: int
    reasons: Counter = field(default_factory=Counter)
    buffers: KVBuffers | None = None
    seconds: float = 0.0  # wall time of the load, lookup included
    pending: Future | None = None  # a background load still running (loader, background=True)

    def settle(self) -> "LoadedPrefix":
        """The finished load (waiting for a background one). Its cache is this one's, which a
        forward may have extended, unless a failed record made the usable prefix shorter."""
        if self.pending is None:
            return self
        final = self.pending.result()
        if final.tokens == self.tokens:
            final.cache = self.cache
        return final


def target_buffers(layout: KVLayout, tokens: int, buffers: KVBuffers | None) -> KVBuffers:
    """`buffers` if given (they must hold `tokens`), else new ones of exactly that size."""
    if buffers is None:
        return KVBuffers(layout, tokens)
    if buffers.capacity < tokens:
        raise ValueError(f"KV buffers hold {buffers.capacity} tokens, the prefix needs {tokens}")
    return buffers


def loaded_prefix(plan: PrefixPlan, usable_segments, buffers: KVBuffers, max_tokens: int | None, nbytes: int,
                  reasons: Counter, started: float, ready=None) -> LoadedPrefix:
    """The LoadedPrefix of the segments that loaded (a prefix of the plan's, the tail maybe last)."""
    loaded = sum(count for _, _, count in usable_segments)
    tail_start = len(plan.block_keys) * plan.block_size
    tail = any(start >= tail_start for _, start, _ in usable_segments)
    usable = loaded if max_tokens is None else min(loaded, max_tokens)
    return LoadedPrefix(buffers.cache(usable, ready), usable, len(usable_segments) - int(tail), tail, nbytes,
                        reasons, buffers, seconds=time.perf_counter() - started)


def available_segments(client, plan: PrefixPlan, reasons: Counter) -> list[tuple[bytes, int, int]]:
    """The stored prefix of the plan's segments, from one batched lookup of every block and the
    tail (layer 0 present ⇒ all layers: a segment is written in one atomic put)."""
    segments = plan.segments()
    if not segments:
        return []
    present = client.exists([record_key(key, 0) for key, _, _ in segments])
    usable = prefix_length(present)
    if usable < len(plan.block_keys):
        reasons["absent"] += 1
    return segments[:usable]


def export_segment(cache: DynamicCache, key: bytes, start: int, count: int, codec: str = "none") -> list[tuple[bytes, bytes]]:
    """The records of tokens [start, start + count) of a (batch 1) cache, all layers, keyed by `key`."""
    items = []
    for layer, cache_layer in enumerate(cache.layers):
        k = cache_layer.keys[0, :, start : start + count]
        v = cache_layer.values[0, :, start : start + count]
        if k.shape[1] != count:
            raise ValueError(f"cache layer {layer} holds {cache_layer.keys.shape[2]} tokens, need {start + count}")
        items.append((record_key(key, layer), encode(k, v, layer, codec)))
    return items
