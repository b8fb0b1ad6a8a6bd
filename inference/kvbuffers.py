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

    `keys`/`values` are views made on first use (a cache of 30 layers costs ~0.2 ms of view
    making otherwise, a tenth of a short load); assigning a tensor to them adopts it as the
    buffer, so DynamicLayer's own methods (offload, batch reshuffles) keep working.
    `ready`, if given, is called (once) before the first update: a loader still filling this
    layer hands over a wait for it, so the forward can start on earlier layers meanwhile.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int,
                 ready: Callable[[], None] | None = None) -> None:
        self._bufs = [keys, values]
        self._views: tuple[torch.Tensor, torch.Tensor] | None = None
        self.length = length
        super().__init__()
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        self._ready = ready

    def _view(self, i: int) -> torch.Tensor:
        if self._views is None:
            self._views = (self._bufs[0].narrow(2, 0, self.length), self._bufs[1].narrow(2, 0, self.length))
        return self._views[i]

    def _adopt(self, i: int, tensor: torch.Tensor | None) -> None:
        if tensor is not None:  # None: DynamicLayer clearing; the buffers stay for reuse
            self._bufs[i] = tensor
            self.length, self._views = tensor.shape[-2], None

    keys = property(lambda self: self._view(0), lambda self, t: self._adopt(0, t))
    values = property(lambda self: self._view(1), lambda self, t: self._adopt(1, t))

    @property
    def capacity(self) -> int:
        return self._bufs[0].shape[-2]

    def _set_length(self, length: int) -> None:
        self.length, self._views = length, None

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
        old_k = self._bufs[0]
        shape = (batch, old_k.shape[1], max(needed, 2 * old_k.shape[2]), old_k.shape[3])
        new = [torch.empty(shape, dtype=old_k.dtype, device=old_k.device) for _ in range(2)]
        if batch == old_k.shape[0]:
            new[0][:, :, : self.length].copy_(self.keys)
            new[1][:, :, : self.length].copy_(self.values)
        self._bufs, self._views = new, None

    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0

    def reset(self) -> None:
        super().reset()
        self._set_length(0)

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last -`tokens_to_remove` tokens (DynamicLayer's convention); the room stays."""
        self.wait_ready()
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}")
        self._set_length(max(0, self.length + tokens_to_remove))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.wait_ready()
        super().batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.wait_ready()
        super().batch_select_indices(indices)


class KVBuffers:
    """Per layer one [2, 1, kv_heads, capacity, head_dim] tensor: keys at [0], values at [1].

    K and V of a layer sit in one tensor so that a stored record (K ‖ V of a block) lands with
    one copy; each is a [1, kv_heads, capacity, head_dim] view, which is what attention reads.
    """

    def __init__(self, layout, capacity: int) -> None:
        self.layout, self.capacity = layout, capacity
        shape = (2, 1, layout.kv_heads, capacity, layout.head_dim)
        self.layers = [torch.empty(shape, dtype=layout.dtype, device=layout.device) for _ in range(layout.num_layers)]
        self.kv = [(both[0], both[1]) for both in self.layers]
        self._bytes: list | None = None

    def bytes_views(self) -> list:
        """Per layer, a numpy uint8 view [2, kv_heads, capacity, head_dim * itemsize] (CPU only)."""
        if self._bytes is None:
            self._bytes = [both[:, 0].view(torch.uint8).numpy() for both in self.layers]
        return self._bytes

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.layers)

    def span(self, layer: int, start: int, count: int) -> torch.Tensor:
        """The [2, kv_heads, count, head_dim] slot of tokens [start, start + count) of `layer`."""
        return self.layers[layer][:, 0, :, start : start + count]

    def cache(self, tokens: int, ready: list[Callable[[], None]] | None = None) -> DynamicCache:
        """A DynamicCache over the first `tokens` positions, with the rest as room to grow."""
        cache = DynamicCache()  # KVLayout.of admits full-attention models only: one layer each
        cache.layers = [ReservedLayer(k, v, tokens, ready[i] if ready else None) for i, (k, v) in enumerate(self.kv)]
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
