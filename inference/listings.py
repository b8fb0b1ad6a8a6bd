"""Model glue of the context market: publish a document, read listings with provenance, audit them.

- ``publish_document``: the publisher's generator has stored a document's blocks; this reads
  them back, signs a manifest (SHA-256 of every record) and publishes it (docs/market.md).
- ``ListingReader``: given to ``CachedGenerator(listings=...)``. For each prompt it matches the
  prompt's block keys against the listings the tenant may read (pure hashing: a listing names
  its namespace root), and with one batched lookup of both its own keys and the listing's picks
  the longer stored prefix. Loads from a listing go through ``ListingStore``, which checks every
  record's SHA-256 against the signed manifest before the loader sees it: a record that fails is
  a counted miss (``provenance``) and is recomputed, never used.
- ``audit_listing``: recompute K random blocks with the model and compare them bit for bit.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from kvclient.market import ListingView, Market
from kvproto import market as mk
from kvproto.keys import record_key

from .blocks import PrefixPlan, export_segment, plan_prefix
from .codec import HEADER_SIZE, RecordError, parse_header, raw_payload
from .listing_match import (
    ListingIndex,
    ListingSource,
    as_listed,
    best_listing,
    leading_runs,
    prompt_entry,
    rejected_entries,
    stored_manifest,
    trusted_listings,
)

log = logging.getLogger(__name__)


def load_trust(path: str) -> dict[str, bytes]:
    """publisher tenant -> raw Ed25519 public key, from 'TENANT HEXKEY' lines (# comments)."""
    trust: dict[str, bytes] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            fields = line.split("#", 1)[0].split()
            if not fields:
                continue
            try:
                tenant, key = fields
                raw = bytes.fromhex(key)
                if len(raw) != 32:
                    raise ValueError
            except ValueError:
                raise ValueError(f"trust file {path} line {number}: expected 'TENANT HEX-ED25519-KEY'") from None
            trust[tenant] = raw
    return trust


def public_key_hex(private_key) -> str:
    return mk.sign(private_key, b"")[1].hex()


def publish_document(generator, client, tokens: list[int], listing: str, publisher: str, private_key, *,
                     price_per_1k_loaded: float, price_per_1m_token_hours: float = 0.0,
                     visibility: str = "granted", audit_blocks: int = 0) -> mk.Manifest:
    """Sign and publish the stored blocks of `tokens` in the generator's own namespace
    (`audit_blocks` > 0: pending until an audit of that many blocks passes, docs/market.md)."""
    raw = document_manifest(generator, client, tokens, listing, publisher, price_per_1k_loaded=price_per_1k_loaded,
                            price_per_1m_token_hours=price_per_1m_token_hours, visibility=visibility)
    Market(client).publish(raw, private_key, audit_blocks=audit_blocks)
    return mk.parse_manifest(raw)


def document_manifest(generator, client, tokens: list[int], listing: str, publisher: str, *,
                      price_per_1k_loaded: float, price_per_1m_token_hours: float = 0.0,
                      visibility: str = "granted") -> bytes:
    """The canonical manifest of the stored blocks of `tokens` in the generator's namespace
    (what `kvctl publish MANIFEST` takes)."""
    plan = generator.plan(tokens)
    layers = generator.layout.num_layers
    records = [(record_key(key, layer), count) for key, _, count in plan.segments() for layer in range(layers)]
    return stored_manifest(client, records, listing=listing, publisher=publisher, fingerprint=generator.fingerprint,
                           namespace=generator.namespace, block_size=generator.block_size, layers=layers,
                           token_ids=tokens, price_per_1k_loaded=price_per_1k_loaded,
                           price_per_1m_token_hours=price_per_1m_token_hours, visibility=visibility)


class ListingStore:
    """A ``Store`` over one listing for one request: keys become listing keys (one load id),
    every record is checked against the manifest's SHA-256 before the sink sees it, writes are
    dropped (the publisher's chain is not the reader's to extend)."""

    def __init__(self, client, view: ListingView, listing: ListingIndex | None = None) -> None:
        self.client = client
        self.view = view
        self.listing = listing if listing is not None else ListingIndex.of(view)
        self.source = ListingSource.of(view.manifest)  # one load id for the request
        self.rejected: list[int] = []  # manifest indices of records provenance refused
        self.hashed_bytes = 0
        self.hash_seconds = 0.0
        self._lock = threading.Lock()

    def _key(self, key: bytes) -> bytes:
        return self.source.key(key)

    def exists(self, keys) -> list[bool]:
        keys = [keys] if isinstance(keys, bytes) else list(keys)
        return self.client.exists([self._key(k) for k in keys])

    def read_into(self, keys, sink, verify: bool = True) -> list[bool]:
        keys = list(keys)
        bad: set[int] = set()

        def checked(batch) -> None:
            good, refused, hashed = [], [], 0
            started = time.perf_counter()
            for item in batch:
                i, view = item[0], item[1]
                index, digest = self.listing.listed(keys[i])
                hashed += len(view)
                if as_listed(keys[i], view, digest):
                    good.append(item)
                else:
                    bad.add(i)
                    refused.append(index)
            with self._lock:
                self.rejected += refused
                self.hashed_bytes += hashed
                self.hash_seconds += time.perf_counter() - started
            if good:
                sink(good)

        found = self.client.read_into([self._key(k) for k in keys], checked, verify)
        return [f and i not in bad for i, f in enumerate(found)]

    def get_many(self, keys) -> list[bytes | None]:
        out: list[bytes | None] = [None] * len(keys)

        def keep(batch) -> None:
            for i, view, _ in batch:
                out[i] = bytes(view)

        self.read_into(keys, keep)
        return out

    def put_many(self, items) -> dict:
        return {}


@dataclass
class ListingReader:
    """The listings a tenant may read, matched against each prompt (see the module notes).

    `trust`: publisher -> Ed25519 key; a listing whose signature does not verify against its
    publisher's trusted key is never used. `refresh_seconds`: how long the listing set is kept."""

    client: object
    trust: dict[str, bytes]
    refresh_seconds: float = 30.0
    report: bool = True
    stats: Counter = field(default_factory=Counter)
    _listings: list[ListingIndex] = field(default_factory=list)
    _at: float = -1e18

    def __post_init__(self) -> None:
        self.market = Market(self.client)

    def refresh(self, force: bool = False) -> list[ListingIndex]:
        if force or time.monotonic() - self._at > self.refresh_seconds:
            self._listings = trusted_listings(self.market.listings(), self.trust, self.stats)
            self._at = time.monotonic()
        return self._listings

    def route(self, tokens: list[int], own: PrefixPlan, generator) -> tuple[PrefixPlan, object]:
        """(plan, store) for this prompt: the listing's when it has the longer stored prefix."""
        match = best_listing(self.refresh(), tokens, generator.fingerprint, own.block_size)
        if match is None:
            return own, self.client
        view = match.listing.view
        store = ListingStore(self.client, view, match.listing)
        own_keys = [record_key(key, 0) for key, _, _ in own.segments()]
        present = self.client.exists(own_keys + store.source.probe(match.block_keys))  # the one extra lookup
        own_run, listed_run = leading_runs(present, len(own_keys))
        if listed_run * own.block_size <= sum(c for _, _, c in own.segments()[:own_run]):
            return own, self.client
        self.stats["listing_routes"] += 1
        return plan_prefix(view.manifest.namespace, tokens, own.block_size), store

    def settled(self, store, result) -> None:
        """After a request: report its prompt (token hit ratio) and any record provenance refused."""
        self.last_store = store
        if isinstance(store, ListingStore) and store.rejected:
            self.stats["provenance_rejected"] += len(store.rejected)
            result.miss_reasons["provenance"] += len(store.rejected)
        if not self.report:
            return
        listing = store.view.manifest.listing if isinstance(store, ListingStore) else ""
        entries = [prompt_entry(result.prompt_tokens, result.cached_tokens, listing)]
        if isinstance(store, ListingStore):
            entries += rejected_entries(listing, store.source.load_id, store.rejected)
        try:
            self.market.report(entries)
        except Exception as exc:  # noqa: BLE001 - a lost report costs a statistic, never an answer
            log.warning("usage report failed: %s", exc)


@dataclass
class AuditResult:
    listing: str
    blocks: list[int]
    failed: list[str]

    @property
    def ok(self) -> bool:
        return not self.failed


def audit_listing(client, view: ListingView, model, k: int, seed: int | None = None,
                  atol: float = 0.0) -> AuditResult:
    """Recompute `k` random full blocks of a listing and compare them with the stored records
    (bit for bit with atol=0: same device and dtype as the publisher; within atol otherwise)."""
    m = view.manifest
    full = m.full_blocks
    chosen = sorted(random.Random(seed).sample(range(full), min(k, full)))
    failed: list[str] = []
    if not chosen:
        return AuditResult(m.listing, [], ["the listing has no full block to audit"])
    # the whole document in one forward, as the publisher's generate ran it: a shorter forward
    # gives other kernel shapes, and fp32 sums in another order differ in the last bits
    end = len(m.token_ids)
    cache = DynamicCache(config=model.config)
    device = next(model.parameters()).device
    with torch.inference_mode():
        model(torch.tensor([m.token_ids[:end]], device=device), past_key_values=cache, use_cache=True)
    plan = plan_prefix(m.namespace, m.token_ids, m.block_size)
    store = ListingStore(client, view)
    for b in chosen:
        recomputed = export_segment(cache, plan.block_keys[b], b * m.block_size, m.block_size)
        stored = store.client.get_many([store._key(key) for key, _ in recomputed])
        for (key, fresh), old in zip(recomputed, stored):
            why = _differs(fresh, old, atol)
            if why:
                failed.append(f"block {b} layer {int.from_bytes(key[-2:], 'little')}: {why}")
                break
    return AuditResult(m.listing, chosen, failed)


def _differs(fresh: bytes, stored: bytes | None, atol: float) -> str:
    if stored is None:
        return "not served"
    try:
        header = parse_header(stored)
        raw = raw_payload(stored, header)
    except RecordError as exc:
        return f"unreadable record ({exc})"
    want = fresh[HEADER_SIZE:]
    if bytes(raw) == want:
        return ""
    if atol > 0:
        a = torch.frombuffer(bytearray(raw), dtype=header.dtype)
        b = torch.frombuffer(bytearray(want), dtype=header.dtype)
        if a.shape == b.shape and torch.allclose(a.float(), b.float(), atol=atol, rtol=0):
            return ""
    return "recomputed KV differs from the stored record"


def main(argv: list[str] | None = None) -> int:
    """`python -m inference.listings audit LISTING --nodes ... --model M` (what `kvctl audit` runs):
    prints {"listing", "blocks", "ok", "failed"} as JSON; exit 3 when the listing fails."""
    import argparse
    import json
    import os

    from kvclient import Client

    from .models import load_model

    p = argparse.ArgumentParser(prog="python -m inference.listings")
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("audit")
    a.add_argument("listing")
    a.add_argument("--nodes", required=True)
    a.add_argument("--model", required=True)
    a.add_argument("--blocks", type=int, default=4)
    a.add_argument("--dtype", default="float32")
    a.add_argument("--seed", type=int, default=None)
    a.add_argument("--atol", type=float, default=0.0)
    args = p.parse_args(argv)
    token = os.environ.get("KVCTL_AUDIT_TOKEN") or None  # never on the command line (ps shows it)
    with Client(args.nodes, replication=len(args.nodes.split(",")), token=token) as client:
        views = Market(client).listings(args.listing)
        if not views:
            raise SystemExit(f"no listing {args.listing!r} you may read")
        model, _ = load_model(args.model, dtype=getattr(torch, args.dtype))
        result = audit_listing(client, views[0], model, args.blocks, args.seed, args.atol)
    print(json.dumps({"listing": result.listing, "blocks": result.blocks, "ok": result.ok, "failed": result.failed}))
    return 0 if result.ok else 3


if __name__ == "__main__":
    raise SystemExit(main())
