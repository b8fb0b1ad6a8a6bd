"""Which listing holds a prompt's prefix: the pure part of reading the context market (docs/market.md).

No torch, no I/O: the transformers reader (``inference.listings.ListingReader``) and the vLLM
connector's scheduler (``inference.vllm.listings``) both use it.

- ``trusted_listings``: the listings a reader may use: signed by the key its trust file names for
  the publisher, status ``ok``, not withdrawn.
- ``best_listing``: the prompt's block keys in each listing's namespace (the manifest carries the
  publisher's ``h0``) matched against the blocks the listing names; the longest leading run wins.
  Nothing is looked up here: the caller checks the winner's records with one batched ``exists``.
- ``prompt_entry`` / ``rejected_entries``: what a reader reports after a request (``Report``).
"""

from __future__ import annotations

import logging
import secrets
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from kvclient.market import ListingView
from kvproto import market as mk
from kvproto.keys import block_keys
from kvproto.pb import kvcache_pb2 as pb
from kvproto.record import prefix_length

log = logging.getLogger(__name__)
LAYER0 = b"\x00\x00"


@dataclass(frozen=True)
class ListingMatch:
    view: ListingView
    block_keys: list[bytes]  # the prompt's leading block keys that the listing names

    @property
    def run(self) -> int:
        return len(self.block_keys)


def trusted_listings(views: Iterable[ListingView], trust: dict[str, bytes],
                     stats: Counter | None = None) -> list[ListingView]:
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
            usable.append(view)
    return usable


def listed_blocks(manifest: mk.Manifest) -> set[bytes]:
    """Block keys the manifest lists a layer-0 record of."""
    return {key[:32] for key, _, _ in manifest.records if key[-2:] == LAYER0}


def best_listing(views: Iterable[ListingView], tokens: Sequence[int], fingerprint: str,
                 block_size: int) -> ListingMatch | None:
    """The listing (same model, same block size) naming the most leading blocks of `tokens`."""
    best: ListingMatch | None = None
    for view in views:
        m = view.manifest
        if m.fingerprint != fingerprint or m.block_size != block_size:
            continue
        listed = listed_blocks(m)
        # hashing past the listing's block count cannot match: stop there
        keys = block_keys(m.namespace, tokens[: block_size * len(listed)], block_size)
        run = prefix_length([key in listed for key in keys])
        if run and (best is None or run > best.run):
            best = ListingMatch(view, keys[:run])
    return best


def prompt_entry(prompt_tokens: int, cached_tokens: int, listing: str = "") -> pb.MeterEntry:
    """A request's prompt length and cached tokens (the node's token hit ratio)."""
    return pb.MeterEntry(id=secrets.token_bytes(16), kind="prompt", tokens=cached_tokens,
                         prompt_tokens=prompt_tokens, listing=listing)


def rejected_entries(listing: str, load_id: bytes, indices: Iterable[int]) -> list[pb.MeterEntry]:
    """Records of one load that provenance refused, by manifest index (the node credits each
    one only if the stored record really differs from its manifest digest)."""
    return [pb.MeterEntry(id=mk.meter_id(b"rejected", load_id, bytes([i % 256, i // 256])), kind="rejected",
                          listing=listing, records=i) for i in indices if i >= 0]
