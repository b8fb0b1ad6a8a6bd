"""Cost model of KV reuse: pure functions and frozen presets, no I/O (issue 5, DESIGN §7).

Units: bytes, seconds, US dollars; GB = 1e9 bytes (cloud egress is billed in decimal GB);
bandwidth in bits per second.

How the paper's figures are reproduced (derivations, tested in tests/test_economics.py):
- Qwen3-4B fp16 KV: 36 layers x 8 KV heads x 128 head dim x 2 (K, V) x 2 B = 147,456 B/token,
  i.e. 0.1475 MB, which the paper prints as 0.148 MB. A 3,774-token document is 556,498,944 B.
- "$0.049 per 0.54 GB load" at $0.09/GB: 0.54 GB x 0.09 = $0.0486. Only 0.539-0.550 GB round to
  $0.049; the exact 556.5 MB of a 3,774-token document costs $0.0501. 0.54 matches the same byte
  count divided by 1.024e9 (one KiB step mixed with decimal MB: 543,456 KiB); in GiB it is 0.518.
- "egress about 2.6x the prefill it saves": the prefill of 3,774 tokens must cost
  $0.049 / 2.6 = $0.0188. With the paper's own measured prefill time (14.71 s, M1 Pro MPS, i.e.
  256.6 tok/s) that is a GPU price of $4.60/hour (PAPER preset). Any pair with
  $/hour / (tok/s) = 0.0179 reproduces the ratio, e.g. $2.50/h at 139 tok/s.
- Fleet: 80M agents x $0.0188 = $1.5M re-prefill; reuse at the paper's 49.7x speed-up costs
  1/49.7 of that, $0.030M. So the fleet table prices reuse as GPU time, transfer free.
- On a real H100 (DESIGN §5: 3,774 tokens in 0.06-0.1 s) the same prefill costs ~$0.00007, so
  cross-provider egress is ~750x the prefill it saves, not 2.6x (H100 preset).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

GB = 1e9
MB = 1e6
DEFAULT_EGRESS_USD_PER_GB = 0.09
DTYPE_BYTES = {
    "float32": 4, "fp32": 4, "float16": 2, "fp16": 2, "half": 2,
    "bfloat16": 2, "bf16": 2, "float8": 1, "fp8": 1, "int8": 1,
}
PAPER_DOC_TOKENS = 3774


@dataclass(frozen=True)
class KVShape:
    """What sets the size of a model's KV cache."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int = 2

    @property
    def bytes_per_token(self) -> int:
        return kv_bytes_per_token(self.layers, self.kv_heads, self.head_dim, self.dtype_bytes)


QWEN3_4B = KVShape(layers=36, kv_heads=8, head_dim=128, dtype_bytes=2)


def kv_bytes_per_token(layers: int, kv_heads: int, head_dim: int, dtype_bytes: int = 2) -> int:
    """layers x kv_heads x head_dim x 2 (K and V) x bytes per element."""
    return layers * kv_heads * head_dim * 2 * dtype_bytes


def kv_shape_from_config(config: Mapping | object, dtype: str = "float16") -> KVShape:
    """KVShape from a HF config object or a config.json dict (GQA and explicit head_dim aware)."""
    get = config.get if isinstance(config, Mapping) else (lambda k, d=None: getattr(config, k, d))
    heads = get("num_attention_heads")
    kv_heads = get("num_key_value_heads") or heads
    head_dim = get("head_dim") or get("hidden_size") // heads
    return KVShape(get("num_hidden_layers"), kv_heads, head_dim, DTYPE_BYTES[dtype])


def kv_bytes(tokens: int, shape: KVShape = QWEN3_4B) -> int:
    return tokens * shape.bytes_per_token


def egress_usd(nbytes: float, usd_per_gb: float = DEFAULT_EGRESS_USD_PER_GB) -> float:
    return nbytes / GB * usd_per_gb


def gpu_usd(seconds: float, gpu_usd_per_hour: float) -> float:
    return seconds * gpu_usd_per_hour / 3600.0


def prefill_seconds(tokens: int, prefill_tokens_per_s: float) -> float:
    return tokens / prefill_tokens_per_s


def prefill_usd(tokens: int, prefill_tokens_per_s: float, gpu_usd_per_hour: float) -> float:
    """tokens / prefill tok/s x GPU $/hour / 3600."""
    return gpu_usd(prefill_seconds(tokens, prefill_tokens_per_s), gpu_usd_per_hour)


def break_even_reuses(speedup: float) -> float:
    """N* = r / (r - 1): storing costs one prefill, each reuse saves (1 - 1/r) of one."""
    return math.inf if speedup <= 1 else speedup / (speedup - 1)


def transfer_seconds(nbytes: float, bps: float, latency_s: float = 0.0) -> float:
    return latency_s + nbytes * 8 / bps


def crossover_bps(nbytes: float, prefill_s: float) -> float:
    """The bandwidth at which fetching the KV takes as long as recomputing it."""
    return nbytes * 8 / prefill_s


@dataclass(frozen=True)
class CostPreset:
    name: str
    gpu_usd_per_hour: float
    prefill_tokens_per_s: float
    reuse_speedup: float
    egress_usd_per_gb: float = DEFAULT_EGRESS_USD_PER_GB
    note: str = ""


PAPER = CostPreset(
    "paper", gpu_usd_per_hour=4.60, prefill_tokens_per_s=PAPER_DOC_TOKENS / 14.71, reuse_speedup=49.7,
    note="paper's measured Qwen3-4B prefill (3774 tok in 14.71 s); $/h derived from egress = 2.6x prefill",
)
H100 = CostPreset(
    "h100", gpu_usd_per_hour=3.00, prefill_tokens_per_s=45_000.0, reuse_speedup=49.7,
    note="Qwen3-4B bf16 on one H100: 3774 tok in ~0.084 s (DESIGN §5: 0.06-0.1 s); $3/h on-demand",
)
PRESETS = {p.name: p for p in (PAPER, H100)}


@dataclass(frozen=True)
class Verdict:
    fetch_seconds: float
    fetch_usd: float
    prefill_seconds: float
    prefill_usd: float
    verdict: str  # "fetch" or "recompute"


def fetch_or_recompute(fetch_s: float, egress: float, prefill_s: float, gpu_usd_per_hour: float) -> Verdict:
    """Fetch only if it is both faster and cheaper; the GPU is held (and paid) while it waits."""
    fetch_cost = egress + gpu_usd(fetch_s, gpu_usd_per_hour)
    prefill_cost = gpu_usd(prefill_s, gpu_usd_per_hour)
    ok = fetch_s <= prefill_s and fetch_cost <= prefill_cost
    return Verdict(fetch_s, fetch_cost, prefill_s, prefill_cost, "fetch" if ok else "recompute")


def always_recompute(egress: float, prefill_cost: float) -> bool:
    """Egress above the prefill it saves loses at any bandwidth (even an infinitely fast link)."""
    return egress > prefill_cost


@dataclass(frozen=True)
class FleetRow:
    agents: int
    tokens: int
    placement: str
    reprefill_usd: float
    reuse_usd: float

    @property
    def saved_usd(self) -> float:
        return self.reprefill_usd - self.reuse_usd


def fleet_costs(agents: int, tokens: int, preset: CostPreset, shape: KVShape = QWEN3_4B,
                cross_provider: bool = False) -> FleetRow:
    """Agents each re-reading one shared context: re-prefill it every time, or build it once and
    reuse it (reuse = prefill / speed-up of GPU time, plus egress per load across providers)."""
    one = prefill_usd(tokens, preset.prefill_tokens_per_s, preset.gpu_usd_per_hour)
    transfer = egress_usd(kv_bytes(tokens, shape), preset.egress_usd_per_gb) if cross_provider else 0.0
    reuse = one + agents * (one / preset.reuse_speedup + transfer)
    placement = "cross-provider" if cross_provider else "same provider"
    return FleetRow(agents, tokens, placement, agents * one, reuse)


def fleet_table(preset: CostPreset, agent_counts=(1_000, 1_000_000, 80_000_000),
                tokens: int = PAPER_DOC_TOKENS) -> list[FleetRow]:
    return [fleet_costs(n, tokens, preset, cross_provider=x) for n in agent_counts for x in (False, True)]


@dataclass(frozen=True)
class CacheTariff:
    """A provider's prompt-cache pricing, as multipliers of its input-token price."""

    input_usd_per_mtok: float = 3.0
    cached_read_multiplier: float = 0.1
    cache_write_multiplier: float = 1.25
    min_cacheable_tokens: int = 1024
    ttl_seconds: float = 300.0


TARIFF_5MIN = CacheTariff()
TARIFF_1H = CacheTariff(cache_write_multiplier=2.0, ttl_seconds=3600.0)


@dataclass(frozen=True)
class ReadPrice:
    kind: str  # "uncacheable", "write" (miss or expired), "hit"
    usd: float


def price_cached_read(tokens: int, tariff: CacheTariff, seconds_since_last_use: float | None) -> ReadPrice:
    """Price of sending a prompt prefix once: below the minimum it is never cached; after the TTL
    (or the first time) it is written again at the write premium; otherwise a cheap hit."""
    base = tokens * tariff.input_usd_per_mtok / 1e6
    if tokens < tariff.min_cacheable_tokens:
        return ReadPrice("uncacheable", base)
    if seconds_since_last_use is None or seconds_since_last_use > tariff.ttl_seconds:
        return ReadPrice("write", base * tariff.cache_write_multiplier)
    return ReadPrice("hit", base * tariff.cached_read_multiplier)


def provider_reads_usd(tokens: int, reads: int, interval_s: float, tariff: CacheTariff) -> float:
    """Total for `reads` uses of one prefix, `interval_s` apart (a hit refreshes the TTL)."""
    total, since = 0.0, None
    for _ in range(reads):
        total += price_cached_read(tokens, tariff, since).usd
        since = interval_s
    return total


def provider_break_even_reads(tariff: CacheTariff) -> float:
    """Uses of a prefix within the TTL (the first one writes) from which caching beats paying the
    full input price every time: w + (N - 1) r <= N  =>  N >= (w - r) / (1 - r)."""
    w, r = tariff.cache_write_multiplier, tariff.cached_read_multiplier
    return (w - r) / (1 - r)


@dataclass(frozen=True)
class Compression:
    """A lossless codec as the cost model sees it: bytes shrink by `ratio`; decoding costs
    `decode_bytes_per_s` of raw KV (measured by `kvbench compress`)."""

    name: str
    ratio: float
    decode_bytes_per_s: float

    def stored_bytes(self, raw_bytes: float) -> float:
        return raw_bytes / self.ratio

    def decode_seconds(self, raw_bytes: float) -> float:
        return raw_bytes / self.decode_bytes_per_s


def compressed_fetch_seconds(raw_seconds: float, raw_bytes: float, codec: Compression) -> float:
    """A fetch measured on raw bytes, with compression on: the link moves 1/ratio of the bytes, then
    the client decodes (not overlapped with the transfer: the conservative case)."""
    return raw_seconds / codec.ratio + codec.decode_seconds(raw_bytes)


def break_even_ratio(raw_bytes: float, prefill_s: float, gpu_usd_per_hour: float, egress_usd_per_gb: float,
                     bps: float | None = None, decode_s: float = 0.0) -> float:
    """The compression ratio from which fetching beats recomputing (fetch_or_recompute's rule, both
    faster and cheaper): egress + GPU time of a fetch of raw/r bytes at `bps` (None: infinitely fast)
    plus `decode_s` must stay under the prefill's time and cost. inf when no ratio is enough."""
    prefill_cost = gpu_usd(prefill_s, gpu_usd_per_hour)
    budget_s = prefill_s - decode_s
    budget_usd = prefill_cost - gpu_usd(decode_s, gpu_usd_per_hour)
    if budget_s <= 0 or budget_usd <= 0:
        return math.inf
    per_byte_usd = egress_usd_per_gb / GB + (gpu_usd(8 / bps, gpu_usd_per_hour) if bps else 0.0)
    by_cost = raw_bytes * per_byte_usd / budget_usd
    by_time = raw_bytes * 8 / bps / budget_s if bps else 0.0
    return max(by_cost, by_time, 1.0)
