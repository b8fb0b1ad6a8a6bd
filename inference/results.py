"""What a generate returns, and the streamer that times its first token."""

from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
from transformers.generation.streamers import BaseStreamer


def _cache_kwarg() -> str:
    """generate's name for the cache argument: `cache` where transformers renamed it (5.24
    deprecates `past_key_values`), `past_key_values` before."""
    import inspect

    import transformers.generation.utils as generation_utils

    return "cache" if 'deprecate_kwarg("past_key_values"' in inspect.getsource(generation_utils) else "past_key_values"


CACHE_KWARG = _cache_kwarg()


@dataclass
class GenerationResult:
    sequences: torch.Tensor  # [1, prompt + new tokens]
    prompt_tokens: int
    cached_tokens: int  # prompt tokens whose KV came from the store
    prefilled_tokens: int  # prompt tokens the model computed
    fetch_seconds: float  # lookup + fetch + decode into the cache (with pipelined loads: until the forward starts)
    prefill_seconds: float  # time to the first generated token, fetch excluded
    fetched_bytes: int = 0
    load_seconds: float = 0.0  # the whole load, start to end (overlaps prefill_seconds when pipelined)
    miss_reasons: Counter = field(default_factory=Counter)
    logits: tuple[torch.Tensor, ...] | None = None  # per generated token, if output_logits=True
    published: Future | None = None  # the write-behind of this request's new blocks

    @property
    def new_tokens(self) -> torch.Tensor:
        return self.sequences[0, self.prompt_tokens :]

    @property
    def time_to_first_token(self) -> float:
        return self.fetch_seconds + self.prefill_seconds


class FirstTokenClock(BaseStreamer):
    """Timestamps the first generated token (generate puts the prompt first, then each new token)."""

    def __init__(self, inner: BaseStreamer | None = None) -> None:
        self.inner = inner
        self.puts = 0
        self.first_token_at: float | None = None
        self.prompt_sent = False

    def restart(self) -> None:
        """generate is run again (its prompt is not passed on a second time)."""
        self.puts = 0

    def put(self, value: torch.Tensor) -> None:
        self.puts += 1
        if self.puts == 2 and self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        if self.puts == 1 and self.prompt_sent:
            return
        self.prompt_sent = True
        if self.inner is not None:
            self.inner.put(value)

    def end(self) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        if self.inner is not None:
            self.inner.end()
