"""KV buffers with room to grow, and a pool that keeps them warm between requests.

transformers' DynamicLayer appends every new token with ``torch.cat``: each decode step copies
the whole cache into freshly allocated memory. For a loaded 2,048-token SmolLM2 prefix that is
94 MB per step, and on the CPU fresh memory is paid for again in page faults (glibc hands large
freed blocks back to the kernel), which made the first decode step after a load cost 2x a plain
one. Here the cache lives in buffers sized for prompt + new tokens up front (``ReservedLayer``
writes new tokens in place and only grows, by doubling, past that), and ``KVArena`` hands the
same warm buffers to the next request, the way a serving engine keeps one KV pool.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

ROUND_TOKENS = 1024  # capacities are rounded up to this, so nearby prompt lengths share buffers


class ReservedLayer(DynamicLayer):
    """A DynamicLayer over the first `length` positions of [batch, kv_heads, capacity, head_dim]
    buffers: `update` writes the new tokens in place and returns views, no concatenation.

    `ready`, if given, is called (once) before the first update: a loader still filling this
    layer hands over a wait for it, so the forward can start on earlier layers meanwhile.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int,
                 ready: Callable[[], None] | None = None) -> None:
        super().__init__()
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        self._bufs = (keys, values)
        self._ready = ready
        self._set_length(length)

    @property
    def capacity(self) -> int:
        return self._bufs[0].shape[-2]

    def _set_length(self, length: int) -> None:
        self.length = length
        self.keys = self._bufs[0][:, :, :length]
        self.values = self._bufs[1][:, :, :length]

    def wait_ready(self) -> None:
        ready, self._ready = self._ready, None
        if ready is not None:
            ready()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.wait_ready()
        if not self.is_initialized:  # after reset(): start over in the same buffers
            self.is_initialized = True
            self._set_length(0)
        n, added = self.length, key_states.shape[-2]
        if key_states.shape[0] != self._bufs[0].shape[0] or n + added > self.capacity:
            self._grow(key_states.shape[0], n + added)
        self._bufs[0][:, :, n : n + added].copy_(key_states)
        self._bufs[1][:, :, n : n + added].copy_(value_states)
        self._set_length(n + added)
        return self.keys, self.values

    def _grow(self, batch: int, needed: int) -> None:
        old_k, old_v = self._bufs
        shape = (batch, old_k.shape[1], max(needed, 2 * old_k.shape[2]), old_k.shape[3])
        new = [torch.empty(shape, dtype=old_k.dtype, device=old_k.device) for _ in range(2)]
        if batch == old_k.shape[0]:
            new[0][:, :, : self.length].copy_(self.keys)
            new[1][:, :, : self.length].copy_(self.values)
        self._bufs = (new[0], new[1])

    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0

    def reset(self) -> None:
        super().reset()
        self.length = 0

    def crop(self, tokens_to_remove: int) -> None:
        self.wait_ready()
        super().crop(tokens_to_remove)
        if self.is_initialized and self.keys is not None:
            self._set_length(self.keys.shape[-2])

    def _adopt_current(self) -> None:
        """After a batch reshuffle replaced keys/values: they become the buffers (no spare room)."""
        self._bufs = (self.keys, self.values)
        self.length = self.keys.shape[-2]

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.wait_ready()
        super().batch_repeat_interleave(repeats)
        self._adopt_current()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.wait_ready()
        super().batch_select_indices(indices)
        self._adopt_current()


class KVBuffers:
    """Per layer one [2, 1, kv_heads, capacity, head_dim] tensor: keys at [0], values at [1].

    K and V of a layer sit in one tensor so that a stored record (K ‖ V of a block) lands with
    one copy; each is a [1, kv_heads, capacity, head_dim] view, which is what attention reads.
    """

    def __init__(self, layout, capacity: int) -> None:
        self.layout, self.capacity = layout, capacity
        shape = (2, 1, layout.kv_heads, capacity, layout.head_dim)
        self.layers = [torch.empty(shape, dtype=layout.dtype, device=layout.device) for _ in range(layout.num_layers)]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.layers)

    def span(self, layer: int, start: int, count: int) -> torch.Tensor:
        """The [2, kv_heads, count, head_dim] slot of tokens [start, start + count) of `layer`."""
        return self.layers[layer][:, 0, :, start : start + count]

    def cache(self, tokens: int, ready: list[Callable[[], None]] | None = None) -> DynamicCache:
        """A DynamicCache over the first `tokens` positions, with the rest as room to grow."""
        cache = DynamicCache()  # KVLayout.of admits full-attention models only: one layer each
        for i, both in enumerate(self.layers):
            cache.layers.append(ReservedLayer(both[0], both[1], tokens, ready[i] if ready else None))
        return cache


def round_capacity(tokens: int) -> int:
    return max(ROUND_TOKENS, -(-tokens // ROUND_TOKENS) * ROUND_TOKENS)


class KVArena:
    """Idle KVBuffers kept for the next request (at most `keep` sets and `max_bytes` in all).

    `take` hands out the smallest idle set that is big enough, or a new one; `give` returns a set
    once nothing reads it any more (the generator gives it back after its write-behind is done).
    """

    def __init__(self, layout, keep: int = 1, max_bytes: int = 4 << 30) -> None:
        self.layout, self.keep, self.max_bytes = layout, keep, max_bytes
        self._idle: list[KVBuffers] = []
        self._lock = threading.Lock()
        self.reused = self.allocated = 0

    def take(self, tokens: int) -> KVBuffers:
        with self._lock:
            fitting = [b for b in self._idle if b.capacity >= tokens]
            if fitting:
                best = min(fitting, key=lambda b: b.capacity)
                self._idle.remove(best)
                self.reused += 1
                return best
            self.allocated += 1
            self._idle.clear()  # too small for this request: let the memory go before allocating
        return KVBuffers(self.layout, round_capacity(tokens))

    def give(self, buffers: KVBuffers) -> None:
        with self._lock:
            self._idle.append(buffers)
            self._idle.sort(key=lambda b: b.capacity, reverse=True)
            while self._idle and (len(self._idle) > self.keep or sum(b.nbytes for b in self._idle) > self.max_bytes):
                self._idle.pop()  # drop the smallest first (an oversized one alone is dropped too)

    def clear(self) -> None:
        with self._lock:
            self._idle.clear()
