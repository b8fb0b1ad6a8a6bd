"""Bills from usage: tariffs are parameters (presets modelled on published price lists), never claims.

Pure functions. A statement per tenant for a period: cache reads at the tariff's read multiplier
of the input price, writes at its write multiplier, storage per 1M token-hours, the listing fees
it paid to publishers; each publisher's earnings (fees less the provider's market cut); and the
prefill the reads saved, from the tariff's prefill model (fill it from ``bench.economics``: the
`paper` preset is 4.60 $/h, 256.6 tok/s, 49.7x; ``kvbench market`` does).)
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields

from .market import ListingView, Usage

# Late-2026 list prices as DESIGN §10 records them: re-check before quoting any figure.
PRESETS = {
    "anthropic-5m": dict(input_usd_per_mtok=3.0, cache_read_multiplier=0.1, cache_write_multiplier=1.25),
    "anthropic-1h": dict(input_usd_per_mtok=3.0, cache_read_multiplier=0.1, cache_write_multiplier=2.0),
    "openai": dict(input_usd_per_mtok=1.25, cache_read_multiplier=0.1, cache_write_multiplier=1.0),
    "gemini-explicit": dict(input_usd_per_mtok=1.25, cache_read_multiplier=0.1, cache_write_multiplier=1.0,
                            storage_usd_per_mtok_hour=4.50),
}


@dataclass(frozen=True)
class Tariff:
    name: str = "custom"
    input_usd_per_mtok: float = 3.0
    cache_read_multiplier: float = 0.1
    cache_write_multiplier: float = 1.25
    storage_usd_per_mtok_hour: float = 0.0
    market_fee: float = 0.2  # the provider's share of listing fees
    # the prefill a read saved (bench.economics): GPU $/hour, prefill tokens/s, measured reuse ratio
    gpu_usd_per_hour: float = 0.0
    prefill_tokens_per_s: float = 0.0
    reuse_speedup: float = 0.0


def load_tariff(path: str) -> Tariff:
    """A tariff from a JSON file: {"preset": NAME, ...overrides} or every field; ValueError (one
    line) for a malformed file, an unknown field or preset, a negative or non-finite number."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"tariff {path}: {exc}".splitlines()[0]) from None
    return tariff_from(doc, path)


def tariff_from(doc, source: str = "tariff") -> Tariff:
    if not isinstance(doc, dict):
        raise ValueError(f"{source}: a JSON object expected")
    doc = dict(doc)
    preset = doc.pop("preset", None)
    values: dict = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"{source}: unknown preset {preset!r} (have {', '.join(sorted(PRESETS))})")
        values.update(PRESETS[preset], name=preset)
    known = {f.name for f in fields(Tariff)}
    for key, value in doc.items():
        if key not in known:
            raise ValueError(f"{source}: unknown field {key!r} (have {', '.join(sorted(known))})")
        if key == "name":
            if not isinstance(value, str):
                raise ValueError(f"{source}: {key} must be a string")
        elif not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{source}: {key} must be a finite number >= 0, got {value!r}")
        values[key] = value
    tariff = Tariff(**values)
    if tariff.market_fee > 1:
        raise ValueError(f"{source}: market_fee is a share, at most 1")
    return tariff


def prefill_saved_usd(tokens: int, tariff: Tariff) -> float:
    """GPU prefill of `tokens` at the tariff's prefill model, less the reuse that replaced it."""
    if not (tariff.prefill_tokens_per_s > 0 and tariff.reuse_speedup > 0):
        return 0.0
    prefill = tokens / tariff.prefill_tokens_per_s * tariff.gpu_usd_per_hour / 3600
    return prefill * (1 - 1 / tariff.reuse_speedup)


@dataclass
class Statement:
    tenant: str
    tokens_loaded: int
    read_usd: float
    write_usd: float
    storage_usd: float
    listing_fees_usd: float
    total_usd: float
    earnings_usd: float  # from its listings, after the market fee
    prefill_saved_usd: float  # GPU prefill the loads replaced, less the reuse (bench.economics)
    input_saved_usd: float  # what the loaded tokens would cost at the full input price, less the read


def bill(usage: dict[str, Usage], listings: list[ListingView], tariff: Tariff) -> dict:
    """Statements per tenant, earnings per publisher and the provider's take, in USD."""
    price = {v.manifest.listing: (v.manifest.price_per_1k_loaded, v.manifest.publisher) for v in listings}
    earnings: dict[str, float] = {}
    fees: dict[str, float] = {}
    per_mtok = tariff.input_usd_per_mtok / 1e6
    for tenant, u in usage.items():
        if tenant.startswith("listing:"):
            continue
        for listing, tokens in u.listings.items():
            per_1k, publisher = price.get(listing, (0.0, ""))
            if publisher == tenant or not publisher:
                continue  # a publisher reading its own listing pays no fee
            fee = tokens / 1000 * per_1k
            fees[tenant] = fees.get(tenant, 0.0) + fee
            earnings[publisher] = earnings.get(publisher, 0.0) + fee * (1 - tariff.market_fee)
    statements = []
    for tenant, u in sorted(usage.items()):
        if tenant.startswith("listing:"):
            continue
        charged = max(0, u.tokens_loaded - u.rejected_tokens)
        read = charged * per_mtok * tariff.cache_read_multiplier
        write = u.tokens_written * per_mtok * tariff.cache_write_multiplier
        storage = u.token_hours_stored / 1e6 * tariff.storage_usd_per_mtok_hour
        fee = fees.get(tenant, 0.0)
        statements.append(Statement(tenant, charged, read, write, storage, fee, read + write + storage + fee,
                                    earnings.get(tenant, 0.0), prefill_saved_usd(charged, tariff),
                                    charged * per_mtok * (1 - tariff.cache_read_multiplier)))
    provider = sum(s.read_usd + s.write_usd + s.storage_usd for s in statements) + sum(fees.values()) * tariff.market_fee
    return {"tariff": asdict(tariff), "statements": [asdict(s) for s in statements],
            "publisher_earnings_usd": earnings, "provider_usd": provider}
