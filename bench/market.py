"""kvbench market: N buyers x M published documents with a Zipf popularity, priced from measured times.

One real auth node, a real model: a publisher stores and lists a document, a granted buyer loads it
through ``CachedGenerator(listings=...)`` (SHA-256 provenance on every record). Measured: prefill
vs reuse time (time to the first token, median), the provenance check's share of the load and its
GB/s. The market is then priced from those ratios: each buyer's cost against re-prefilling, each
publisher's earnings, the provider's margin under the tariff's read multiplier, and the number of
loads from which a listing pays its publisher back.
"""

from __future__ import annotations

import hashlib
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .economics import PRESETS as ECON, prefill_usd
from .report import Report, Table


@dataclass(frozen=True)
class MarketParams:
    model: str = "tiny-qwen3"
    doc_tokens: int = 2000
    block_size: int = 256
    buyers: int = 100
    documents: int = 20
    loads_per_buyer: int = 5
    zipf: float = 1.1
    price_per_1k_loaded: float = 0.0006  # the publisher's fee: 0.2x a $3/M input price
    tariff: str = "anthropic-5m"
    market_fee: float = 0.2
    economics_preset: str = "paper"
    repeats: int = 3
    seed: int = 0


def _measure(p: MarketParams) -> dict:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from inference.generator import CachedGenerator
    from inference.listings import ListingReader, public_key_hex, publish_document
    from inference.models import load_model
    from kvclient import Client
    from kvclient.market import Market
    from kvstore.config import ServerConfig
    from kvstore.server import build_node

    model, tokenizer = load_model(p.model)
    vocab = model.config.get_text_config().vocab_size
    rng = torch.Generator().manual_seed(p.seed)
    doc = torch.randint(0, vocab, (p.doc_tokens,), generator=rng).tolist()
    with tempfile.TemporaryDirectory() as tmp:
        tokens_file = f"{tmp}/tokens"
        with open(tokens_file, "w") as f:
            f.write("publisher-token-0123456789abcdef pub\nbuyer-token-0123456789abcdef0123 buyer\n")
        node = build_node(ServerConfig(listen="127.0.0.1:0", data_dir=f"{tmp}/node", sync=False, map_size_gb=2.0,
                                       auth_tokens_file=tokens_file))
        address = f"127.0.0.1:{node.port}"
        key = Ed25519PrivateKey.generate()
        pub = Client([address], replication=1, token="publisher-token-0123456789abcdef")
        buy = Client([address], replication=1, token="buyer-token-0123456789abcdef0123")
        try:
            with CachedGenerator(model, pub, tokenizer, tenant_salt=b"pub", block_size=p.block_size) as gen:
                gen.generate(torch.tensor([doc]), 1, do_sample=False)
                gen.flush()
                manifest = publish_document(gen, pub, doc, "bench-doc", "pub", key,
                                            price_per_1k_loaded=p.price_per_1k_loaded)
            Market(pub).grant("bench-doc", "buyer")
            reader = ListingReader(buy, {"pub": bytes.fromhex(public_key_hex(key))}, report=False)
            buyer = CachedGenerator(model, buy, tokenizer, tenant_salt=b"buyer", block_size=p.block_size,
                                    publish=False, listings=reader)
            prefill, reuse, loaded, hashed, hash_s, load_s = [], [], [], 0, 0.0, 0.0
            for i in range(p.repeats):
                question = torch.randint(0, vocab, (16,), generator=rng).tolist()
                ids = torch.tensor([doc + question])
                start = time.perf_counter()
                with torch.inference_mode():
                    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False)
                prefill.append(time.perf_counter() - start)
                result = buyer.generate(ids, 1, do_sample=False)
                reuse.append(result.time_to_first_token)
                loaded.append(result.cached_tokens)
                store = reader.last_store
                hashed, hash_s, load_s = hashed + store.hashed_bytes, hash_s + store.hash_seconds, load_s + result.load_seconds
        finally:
            pub.close()
            buy.close()
            node.stop(0)
    buf = np.random.default_rng(0).integers(0, 255, 1 << 20, dtype=np.uint8).tobytes()
    start = time.perf_counter()
    for _ in range(256):
        hashlib.sha256(buf).digest()
    sha_gbps = 256 * len(buf) / (time.perf_counter() - start) / 1e9
    pre, re_ = statistics.median(prefill), statistics.median(reuse)
    return {"prefill_s": pre, "reuse_s": re_, "ratio": pre / re_, "loaded_tokens": loaded,
            "kv_bytes_per_load": hashed / p.repeats, "provenance_gbps_on_load": hashed / hash_s / 1e9 if hash_s else None,
            "provenance_share_of_load": hash_s / load_s if load_s else None, "sha256_gbps_1mib": sha_gbps,
            "provenance_ms_per_mb": hash_s / (hashed / 1e6) * 1e3 if hashed else None,
            "records": len(manifest.records)}


def price(p: MarketParams, measured: dict) -> dict:
    """The market from the measured ratio (pure: tested without a model)."""
    from kvclient.billing import tariff_from

    econ = ECON[p.economics_preset]
    tariff = tariff_from({"preset": p.tariff, "market_fee": p.market_fee, "gpu_usd_per_hour": econ.gpu_usd_per_hour,
                          "prefill_tokens_per_s": econ.prefill_tokens_per_s, "reuse_speedup": measured["ratio"]})
    r = measured["ratio"]
    tokens = measured.get("doc_tokens", p.doc_tokens)
    per_tok = tariff.input_usd_per_mtok / 1e6
    weights = 1.0 / np.arange(1, p.documents + 1) ** p.zipf
    weights /= weights.sum()
    rng = np.random.default_rng(p.seed)
    picks = rng.choice(p.documents, size=(p.buyers, p.loads_per_buyer), p=weights)
    loads_per_doc = np.bincount(picks.ravel(), minlength=p.documents)
    fee = tokens / 1000 * p.price_per_1k_loaded
    read = tokens * per_tok * tariff.cache_read_multiplier
    reprefill = tokens * per_tok
    buyer_reuse = p.loads_per_buyer * (read + fee)
    buyer_reprefill = p.loads_per_buyer * reprefill
    write = tokens * per_tok * tariff.cache_write_multiplier
    earnings = loads_per_doc * fee * (1 - p.market_fee) - write
    gpu_prefill = prefill_usd(tokens, econ.prefill_tokens_per_s, econ.gpu_usd_per_hour)
    provider_cost = loads_per_doc.sum() * gpu_prefill / r + p.documents * gpu_prefill
    provider_revenue = loads_per_doc.sum() * (read + fee * p.market_fee) + p.documents * write
    return {
        "tariff": asdict(tariff), "ratio": r, "buyer_break_even_loads": r / (r - 1) if r > 1 else None,
        "buyer_cost_usd": buyer_reuse, "buyer_reprefill_usd": buyer_reprefill,
        "buyer_saving": 1 - buyer_reuse / buyer_reprefill,
        "loads_per_document": loads_per_doc.tolist(), "publisher_earnings_usd": earnings.tolist(),
        "publisher_break_even_loads": write / (fee * (1 - p.market_fee)) if fee else None,
        "provider_revenue_usd": provider_revenue, "provider_cost_usd": provider_cost,
        "provider_margin": 1 - provider_cost / provider_revenue if provider_revenue else None,
    }


def run(p: MarketParams) -> Report:
    measured = _measure(p)
    market = price(p, measured)
    rows = [[i + 1, n, round(e, 6)] for i, (n, e) in enumerate(zip(market["loads_per_document"],
                                                                    market["publisher_earnings_usd"]))][:10]
    notes = [
        f"measured on {p.model}, {p.doc_tokens} tokens: prefill {measured['prefill_s']:.3f} s, reuse "
        f"{measured['reuse_s']:.3f} s (r = {measured['ratio']:.1f}x), loaded {measured['loaded_tokens']}",
        f"provenance (SHA-256 of every record before it enters the model): "
        f"{measured['provenance_ms_per_mb']:.3f} ms/MB, {measured['provenance_gbps_on_load']:.2f} GB/s on the load "
        f"path, {100 * measured['provenance_share_of_load']:.1f}% of the load; bare SHA-256 "
        f"{measured['sha256_gbps_1mib']:.2f} GB/s on 1 MiB",
        f"buyer: ${market['buyer_cost_usd']:.6f} for {p.loads_per_buyer} loads vs ${market['buyer_reprefill_usd']:.6f} "
        f"re-prefilled ({100 * market['buyer_saving']:.1f}% saved); break-even {market['buyer_break_even_loads']:.3f} loads",
        f"publisher break-even: {market['publisher_break_even_loads']:.1f} loads per listing; provider margin "
        f"{100 * market['provider_margin']:.1f}% under a {market['tariff']['cache_read_multiplier']}x read tariff",
    ]

    def plot(fig) -> None:
        ax = fig.add_subplot(1, 1, 1)
        ax.bar(range(1, p.documents + 1), market["publisher_earnings_usd"])
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xlabel("document (popularity rank)")
        ax.set_ylabel("publisher earnings, USD")
        ax.set_title(f"{p.buyers} buyers x {p.documents} documents, Zipf {p.zipf}")

    return Report("market", asdict(p), {"measured": measured, "market": market},
                  Table(["rank", "loads", "publisher earnings USD"], rows), notes, plot,
                  "Context market: buyers, publishers, provider")
