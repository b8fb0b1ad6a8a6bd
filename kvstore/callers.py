"""Whom a kvcache.v1 call acts for, and the keys it may name.

A tenant's call (any call, on a node without auth) names its client's keys, up to MAX_KEY_BYTES,
in its own key space. On an auth node the cluster's peer token (``kvstore.auth``) takes Put,
Get, Lookup and Scan to the raw key space: the nodes' agents copy records with it and name
stored keys (tenant prefix ‖ key). Those calls are capped per address, not per tenant, and never
metered (a copy is no tenant's write or load).
"""

from __future__ import annotations

from dataclasses import dataclass

from kvproto.errors import InvalidArgument
from kvproto.limits import MAX_KEY_BYTES, MAX_KEYS_PER_CALL
from kvproto.pb import kvcache_pb2 as pb

from .auth import PREFIX_BYTES

RAW_KEY_BYTES = PREFIX_BYTES + MAX_KEY_BYTES  # a stored key, as peers name it on auth nodes


@dataclass(frozen=True)
class Caller:
    prefix: bytes  # the key space its keys are in (b"" without auth, and for a peer's stored keys)
    capped_as: bytes | None = None  # its streams' cap: its tenant on an auth node, else only its address
    peer: bool = False  # a peer node on the raw key space: no market, no meter

    @property
    def key_limit(self) -> int:
        return RAW_KEY_BYTES if self.peer else MAX_KEY_BYTES


ANYONE = Caller(b"")  # every call on a node without auth
PEER = Caller(b"", peer=True)


def check_key(key: bytes, limit: int = MAX_KEY_BYTES) -> None:
    if not key:
        raise InvalidArgument("empty key")
    if len(key) > limit:
        raise InvalidArgument(f"key of {len(key)} bytes exceeds {limit}")


def check_keys(keys, limit: int = MAX_KEY_BYTES) -> None:
    if len(keys) > MAX_KEYS_PER_CALL:
        raise InvalidArgument(f"{len(keys)} keys in one call exceeds {MAX_KEYS_PER_CALL}")
    for key in keys:
        check_key(key, limit)


def split_peer_key(msg: pb.PutRequest, space: bytes | None) -> bytes:
    """A peer's Put names the stored key; the record inside is the client's key (what its digest
    binds) under the tenant prefix, one tenant per stream (one transaction, one ledger owner)."""
    if len(msg.key) <= PREFIX_BYTES:
        raise InvalidArgument(f"a peer put's key is a {PREFIX_BYTES}-byte tenant prefix and a key")
    head = msg.key[:PREFIX_BYTES]
    if space is not None and head != space:
        raise InvalidArgument("a peer put stream carries one tenant's records")
    msg.key = msg.key[PREFIX_BYTES:]
    return head
