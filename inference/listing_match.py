"""Which listing holds a prompt's prefix: the pure part of reading the context market (docs/market.md).

No torch, no I/O: the transformers reader (``inference.listings.ListingReader``) and the vLLM
connector's scheduler (``inference.vllm.listings``) both use it.

- ``trusted_listings``: the listings a reader may use: signed by the key its trust file names for
  the publisher, status ``ok``, not withdrawn; each as a ``ListingIndex`` (what matching and
  provenance need of its manifest, computed once per refresh, never per prompt).
- ``best_listing``: the prompt's block keys in each listing's namespace (the manifest carries the
  publisher's ``h0``) matched against the blocks the listing names; the longest leading run wins.
  Nothing is looked up here: the caller checks the winner's records with one batched ``exists``
  (its answer split by ``leading_runs``), through a ``ListingSource``'s listing keys.
- ``as_listed``: the provenance check of one record read from a listing (SHA-256 of record key ‖
  payload against the manifest).
- ``prompt_entry`` / ``rejected_entries``: what a reader reports after a request (``Report``).
"""

from __future__ import annotations

import logging
import secrets
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from kvclient.market import ListingView, new_load_id
from kvproto import market as mk
from kvproto.keys import block_keys, record_key
from kvproto.pb import kvcache_pb2 as pb
from kvproto.record import prefix_length

log = logging.getLogger(__name__)
LAYER0 = b"\x00\x00"


@dataclass(frozen=True, eq=False)
class ListingIndex:
    """A listing and its manifest's lookups: the blocks it lists a layer-0 record of, and each
    record's manifest index."""

    view: ListingView
    blocks: frozenset[bytes]
    index: dict[bytes, int]  # record key -> manifest index

    @classmethod
    def of(cls, view: ListingView) -> ListingIndex:
        index = view.manifest.index_of()
        return cls(view, frozenset(key[:32] for key in index if key[-2:] == LAYER0), index)

    def listed(self, record: bytes) -> tuple[int, bytes]:
        """(manifest index, SHA-256) of a record key; (-1, b"") for one the manifest lacks."""
        i = self.index.get(record, -1)
        return (i, self.view.manifest.records[i][1]) if i >= 0 else (-1, b"")


@dataclass(frozen=True)
class ListingSource:
    """Where one request reads a listing: listing keys of its tag and one load id (the request's
    retries and hedges reuse it, so the node meters each record once). Plain data: the vLLM
    scheduler pickles it to the worker."""

    listing: str  # the listing id (for reports)
    tag: bytes  # kvproto.market.listing_tag(listing)
    load_id: bytes

    @classmethod
    def of(cls, manifest: mk.Manifest) -> ListingSource:
        return cls(manifest.listing, manifest.tag, new_load_id())

    def key(self, record: bytes) -> bytes:
        return mk.listing_key(record, self.tag, self.load_id)

    def probe(self, blocks: Iterable[bytes]) -> list[bytes]:
        """The layer-0 listing keys of these blocks (for the one batched exists)."""
        return [self.key(record_key(key, 0)) for key in blocks]


@dataclass(frozen=True)
class ListingMatch:
    listing: ListingIndex
    block_keys: list[bytes]  # the prompt's leading block keys that the listing names

    @property
    def run(self) -> int:
        return len(self.block_keys)


def trusted_listings(views: Iterable[ListingView], trust: dict[str, bytes],
                     stats: Counter | None = None) -> list[ListingIndex]:
    """The views whose signature verifies against their publisher's trusted key, status ok."""
    usable = []
    for view in views:
        key = trust.get(view.manifest.publisher)
        try:
            if key is None or key != view.public_key:
                raise mk.ManifestError(f"no trusted key for publisher {view.manifest.publisher!r}")
            mk.verify(view.manifest.raw, view.signature, view.public_key)
        except mk.ManifestError as exc:
            if stats is not None:
                stats["untrusted_listings"] += 1
            log.warning("listing %s not used: %s", view.manifest.listing, exc)
            continue
        if view.status == "ok" and not view.withdrawn_ns:
            usable.append(ListingIndex.of(view))
    return usable


def best_listing(listings: Iterable[ListingIndex], tokens: Sequence[int], fingerprint: str,
                 block_size: int) -> ListingMatch | None:
    """The listing (same model, same block size) naming the most leading blocks of `tokens`."""
    best: ListingMatch | None = None
    for listing in listings:
        m = listing.view.manifest
        if m.fingerprint != fingerprint or m.block_size != block_size:
            continue
        # hashing past the listing's block count cannot match: stop there
        keys = block_keys(m.namespace, tokens[: block_size * len(listing.blocks)], block_size)
        run = prefix_length([key in listing.blocks for key in keys])
        if run and (best is None or run > best.run):
            best = ListingMatch(listing, keys[:run])
    return best


def leading_runs(present: Sequence[bool], own: int) -> tuple[int, int]:
    """The stored leading runs of the one batched exists: of the reader's own chain (its first
    `own` answers) and of the listing's (the rest)."""
    return prefix_length(present[:own]), prefix_length(present[own:])


def as_listed(record: bytes, payload: bytes | memoryview, digest: bytes) -> bool:
    """Whether a listing's record hashes to its manifest digest (b"": not in the manifest)."""
    return bool(digest) and mk.record_digest(record, payload) == digest


def prompt_entry(prompt_tokens: int, cached_tokens: int, listing: str = "") -> pb.MeterEntry:
    """A request's prompt length and cached tokens (the node's token hit ratio)."""
    return pb.MeterEntry(id=secrets.token_bytes(16), kind="prompt", tokens=cached_tokens,
                         prompt_tokens=prompt_tokens, listing=listing)


def rejected_entries(listing: str, load_id: bytes, indices: Iterable[int]) -> list[pb.MeterEntry]:
    """Records of one load that provenance refused, by manifest index (the node credits each
    one only if the stored record really differs from its manifest digest)."""
    return [pb.MeterEntry(id=mk.meter_id(b"rejected", load_id, bytes([i % 256, i // 256])), kind="rejected",
                          listing=listing, records=i) for i in indices if i >= 0]


def stored_manifest(client, records: Sequence[tuple[bytes, int]], **fields) -> bytes:
    """The manifest over records a publisher stored ((record key, tokens) each, read back and
    hashed: SHA-256 of key ‖ payload); `fields` are ``kvproto.market.build_manifest``'s others.
    ValueError if a record is not stored."""
    names = [key for key, _ in records]
    values = client.get_many(names)
    missing = sum(v is None for v in values)
    if missing:
        raise ValueError(f"{missing} of {len(names)} records of the document are not stored: generate it first")
    digests = [(key, mk.record_digest(key, value), tokens) for (key, tokens), value in zip(records, values)]
    return mk.build_manifest(records=digests, **fields)

