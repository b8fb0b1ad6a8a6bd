"""The same request with and without the cache: token equality, logit differences and timings."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .generator import CachedGenerator, GenerationResult, FirstTokenClock


@dataclass
class PlainRun:
    sequences: torch.Tensor
    logits: tuple[torch.Tensor, ...]
    prefill_seconds: float  # time to the first token, one full prefill


@dataclass
class Verification:
    exact: bool  # tokens with reuse == tokens without (the cached run and the run that filled the cache)
    tokens_compared: int
    max_logit_diff: float
    first_logit_diff: float
    prompt_tokens: int
    cached_tokens: int
    prefill_seconds: float  # without the cache: full prefill to the first token
    reuse_seconds: float  # with the cache: fetch + prefill of the rest to the first token
    fetch_seconds: float
    speedup: float
    kv_bytes: int
    kv_bytes_per_token: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def plain_generate(model: torch.nn.Module, ids: torch.Tensor, max_new_tokens: int, **kwargs: Any) -> PlainRun:
    """Ordinary model.generate (greedy unless told otherwise), timed to the first token."""
    clock = FirstTokenClock()
    device = next(model.parameters()).device
    ids = ids.to(device)
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, streamer=clock,
            return_dict_in_generate=True, output_logits=True, **kwargs,
        )
    return PlainRun(out.sequences, out.logits, (clock.first_token_at or time.perf_counter()) - started)


def warm_up(model: torch.nn.Module, ids: torch.Tensor) -> None:
    """One short forward so that first-call costs (allocator, kernels) stay out of the timings."""
    plain_generate(model, ids[:, : min(ids.shape[1], 16)], 1, do_sample=False)


def verify(generator: CachedGenerator, ids: torch.Tensor, max_new_tokens: int) -> tuple[Verification, GenerationResult]:
    """Baseline, then fill the cache (if needed), then the cached run; compare greedy tokens and logits."""
    greedy = dict(do_sample=False)
    warm_up(generator.model, ids)
    baseline = plain_generate(generator.model, ids, max_new_tokens, **greedy)
    filling = generator.generate(ids, max_new_tokens, output_logits=True, **greedy)
    generator.flush()
    cached = generator.generate(ids, max_new_tokens, output_logits=True, **greedy)
    exact = torch.equal(cached.sequences.cpu(), baseline.sequences.cpu()) and torch.equal(
        filling.sequences.cpu(), baseline.sequences.cpu()
    )
    _, max_diff, first_diff = logit_differences(baseline.logits, cached.logits or ())
    reuse = cached.fetch_seconds + cached.prefill_seconds
    per_token = generator.layout.bytes_per_token
    report = Verification(
        exact=exact,
        tokens_compared=baseline.sequences.shape[1] - ids.shape[1],
        max_logit_diff=max_diff,
        first_logit_diff=first_diff,
        prompt_tokens=cached.prompt_tokens,
        cached_tokens=cached.cached_tokens,
        prefill_seconds=baseline.prefill_seconds,
        reuse_seconds=reuse,
        fetch_seconds=cached.fetch_seconds,
        speedup=baseline.prefill_seconds / reuse if reuse > 0 else float("inf"),
        kv_bytes=per_token * cached.prompt_tokens,
        kv_bytes_per_token=per_token,
    )
    return report, cached


def logit_differences(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> tuple[int, float, float]:
    """(steps compared, max |a - b|, that of the first step), up to and including the first differing token."""
    compared, max_diff, first_diff = 0, 0.0, 0.0
    for step_a, step_b in zip(a, b):
        diff = (step_a.float().cpu() - step_b.float().cpu()).abs().max().item()
        first_diff = diff if compared == 0 else first_diff
        max_diff = max(max_diff, diff)
        compared += 1
        if not torch.equal(step_a.argmax(-1).cpu(), step_b.argmax(-1).cpu()):
            break
    return compared, max_diff, first_diff
