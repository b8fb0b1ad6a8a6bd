"""The connector's side of the context market (docs/market.md, "vLLM").

Reading (``listings: true``): ``ListingRouter`` keeps the listings the engine's tenant may read
(``Listings``, refreshed every ``listings_refresh_seconds``, each signature checked against the
trust file) and gives the scheduler, for a prompt, the listing naming most of its leading
blocks (pure hashing, ``inference.listing_match``) as a ``ListingRoute``: the document's block
keys in the publisher's namespace, a ``ListingSource`` (one load id for the request: its retries
and hedges reuse it, so the node meters each record once) and, for each block the scheduler
plans to load, the manifest's SHA-256 of its records, which the worker checks before a byte
reaches vLLM's blocks. The scheduler folds the route's layer-0 listing keys into its one
batched ``exists``. After a request, its prompt length and loaded
tokens are reported to the node (the token hit ratio) off the scheduler's thread.

Publishing: ``publish_stored`` signs and lists the blocks an engine stored of a document.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from kvclient.market import Market
from kvproto import market as mk
from kvproto.errors import KVCacheError
from kvproto.keys import block_keys, record_key

from ..listing_match import ListingIndex, ListingSource, best_listing, prompt_entry, stored_manifest, trusted_listings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ListingRoute:
    source: ListingSource
    keys: list[bytes]  # the prompt's leading block keys in the publisher's namespace
    listing: ListingIndex

    def provenance(self, block: int) -> tuple[tuple[int, bytes], ...]:
        """Per layer, (manifest index, SHA-256) of the block's records: what the worker checks
        ((-1, b""): a layer the manifest does not list)."""
        key, layers = self.keys[block], self.listing.view.manifest.layers
        return tuple(self.listing.listed(record_key(key, layer)) for layer in range(layers))


class ListingRouter:
    def __init__(self, client, trust: dict[str, bytes], refresh_seconds: float, fingerprint: str,
                 block_size: int) -> None:
        self.client, self.trust, self.refresh_seconds = client, trust, refresh_seconds
        self.fingerprint, self.block_size = fingerprint, block_size
        self.market = Market(client)
        self._listings: list[ListingIndex] = []
        self._at = -float("inf")
        self._reports: list = []
        self._sending = False
        self._lock = threading.Lock()
        self._sender = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvstore-report")

    def refresh(self) -> list[ListingIndex]:
        if time.monotonic() - self._at > self.refresh_seconds:
            try:
                self._listings = trusted_listings(self.market.listings(), self.trust)
            except KVCacheError as exc:  # no node answered: keep what was known
                log.warning("kvstore listings not refreshed: %s", exc)
            self._at = time.monotonic()
        return self._listings

    def route(self, tokens: Sequence[int], blocks: int) -> ListingRoute | None:
        """The listing naming most of the first `blocks` blocks of `tokens`, or None."""
        if blocks <= 0:
            return None
        match = best_listing(self.refresh(), tokens[: blocks * self.block_size], self.fingerprint,
                             self.block_size)
        if match is None:
            return None
        return ListingRoute(ListingSource.of(match.listing.view.manifest), match.block_keys, match.listing)

    def report(self, prompt_tokens: int, cached_tokens: int, listing: str) -> None:
        """Queue a request's prompt entry; one thread sends what queued meanwhile in one Report."""
        with self._lock:
            self._reports.append(prompt_entry(prompt_tokens, cached_tokens, listing))
            if self._sending:
                return
            self._sending = True
        self._sender.submit(self._send)

    def _send(self) -> None:
        while True:
            with self._lock:
                batch, self._reports = self._reports, []
                if not batch:
                    self._sending = False
                    return
            try:
                self.market.report(batch)
            except KVCacheError as exc:  # a lost report costs a statistic, never an answer
                log.warning("kvstore usage report failed: %s", exc)

    def close(self) -> None:
        self._sender.shutdown(wait=True)


def publish_stored(client, *, namespace: bytes, fingerprint: str, tokens: Sequence[int], block_size: int,
                   layers: int, listing: str, publisher: str, private_key, price_per_1k_loaded: float,
                   price_per_1m_token_hours: float = 0.0, visibility: str = "granted") -> mk.Manifest:
    """Sign and publish the stored full blocks of `tokens` in `namespace` (what a vLLM engine
    stored: ``inference.vllm.config.request_namespace(fingerprint, tenant_salt, cache_salt)``).

    The manifest covers the full blocks only (vLLM stores no partial block), so its token ids are
    the tokens those blocks hold. ValueError if a record is not stored."""
    keys = block_keys(namespace, tokens, block_size)
    if not keys:
        raise ValueError(f"the document has no full block of {block_size} tokens")
    records = [(record_key(key, layer), block_size) for key in keys for layer in range(layers)]
    raw = stored_manifest(client, records, listing=listing, publisher=publisher, fingerprint=fingerprint,
                          namespace=namespace, block_size=block_size, layers=layers,
                          token_ids=list(tokens[: len(keys) * block_size]), price_per_1k_loaded=price_per_1k_loaded,
                          price_per_1m_token_hours=price_per_1m_token_hours, visibility=visibility)
    Market(client).publish(raw, private_key)
    return mk.parse_manifest(raw)
