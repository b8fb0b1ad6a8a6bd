"""A static cache over the KV buffers, so the decode step can be captured (CUDA graphs).

On a GPU one eager transformers decode step of Qwen3-4B costs ~55 ms of kernel launches, more
than the load it follows: reuse lost to prefill there. transformers captures the step with
``torch.compile(mode="reduce-overhead")`` (CUDA graphs) when the cache is static: fixed-size K/V
tensors at fixed addresses, updated in place, attention masked by position. ``ReservedLayer``'s
buffers already have a fixed capacity, so the same buffers the loader filled become a
``StaticCache`` here, without a copy. Masked positions must hold finite numbers (a masked NaN
still poisons the softmax sum), so the room past the prefix is zeroed.

`static_cache(...)` returns None where the installed transformers' static layer is not the one
this was written against (its attributes are read, never guessed): the caller then stays eager.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import transformers
from packaging.version import Version
from transformers import GenerationConfig
from transformers.cache_utils import Cache, StaticCache, StaticLayer

log = logging.getLogger(__name__)


def _supported() -> bool:
    probe = StaticLayer(max_cache_len=1)
    return isinstance(getattr(probe, "cumulative_length", None), torch.Tensor) and hasattr(probe, "is_initialized")


SUPPORTED = _supported()
# a one-token prefill chunk runs the compiled (captured) forward too; transformers 5.19's chunked
# prefill over a preloaded static cache is not token-exact (tests/test_kvbuffers.py caught it),
# 5.24's is: below that the first step after a load stays an ordinary (uncaptured) forward
CHUNKED_PREFILL = (hasattr(GenerationConfig(), "prefill_chunk_size")
                   and Version(transformers.__version__).release >= (5, 24))


class BufferStaticLayer(StaticLayer):
    """A StaticLayer over caller-owned [1, kv_heads, capacity, head_dim] buffers holding `length`
    tokens already; `ready` (once, before the first update) waits for a loader still filling it."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int,
                 ready: Callable[[], None] | None = None) -> None:
        super().__init__(max_cache_len=keys.shape[-2])
        self.keys, self.values = keys, values
        self.device, self.dtype = keys.device, keys.dtype
        self.batch_size, self.num_heads = keys.shape[:2]
        self.k_head_dim, self.v_head_dim = keys.shape[-1], values.shape[-1]
        self.cumulative_length = torch.tensor(length, dtype=self.cumulative_length.dtype, device=keys.device)
        self.is_initialized = True
        self._ready = ready
        torch._dynamo.mark_static_address(self.keys)
        torch._dynamo.mark_static_address(self.values)
        torch._dynamo.mark_static_address(self.cumulative_length)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        ready, self._ready = self._ready, None
        if ready is not None:
            ready()
        return super().update(key_states, value_states, *args, **kwargs)


def static_cache(kv: list[tuple[torch.Tensor, torch.Tensor]], length: int, needed: int,
                 ready: list[Callable[[], None]] | None = None) -> StaticCache | None:
    """A StaticCache over per-layer (keys, values) buffers whose first `length` positions hold
    the prefix; None if the buffers cannot hold `needed` tokens or transformers differs."""
    if not SUPPORTED or not kv or kv[0][0].shape[-2] < needed:
        return None
    for keys, values in kv:
        # the room past the prefix must be finite: wait for the loader first where it writes there
        keys[:, :, length:].zero_()
        values[:, :, length:].zero_()
    cache = StaticCache.__new__(StaticCache)
    Cache.__init__(cache, layers=[BufferStaticLayer(k, v, length, ready[i] if ready else None)
                                  for i, (k, v) in enumerate(kv)])
    return cache
