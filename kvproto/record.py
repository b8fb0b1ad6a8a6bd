"""The stored record, defined once: a fixed, versioned header, the payload, one digest.

Layout (little-endian, 32 bytes): magic b"KVR2" | version u16 | flags u16 | payload length u64 |
XXH3-128 of (key ‖ payload) (16 bytes, big-endian as xxhash gives it). The payload follows.

The digest binds the record to the key it was written under (the caller's key, without the
node's tenant prefix): a damaged LMDB page that makes key A's lookup land on key B's intact
bytes reads as Corrupt, not as B's record (DESIGN §9). It is checked once per hop: by the node
on receipt, and by whoever reads the record (the gRPC client after reassembly, the co-located
reader, the in-process store). What the payload holds (a KV layer: ``inference.codec``) carries
no checksum of its own.

Format 1 (b"KVR1", a digest of the payload alone) is not read: a node whose files hold it
refuses to open and names ``kvstore migrate``.
"""

from __future__ import annotations

import struct

import xxhash

from .errors import Corrupt

# The node's LMDB layout, shared with co-located readers: named databases, the meta key that
# identifies an environment (checked against the node's LocalInfo) and the one naming its format.
DATA_DB = b"data"
META_DB = b"meta"
ENV_TOKEN = b"env_token"
FORMAT_KEY = b"record_format"

MAGIC = b"KVR2"
VERSION = 2
LEGACY_MAGIC = b"KVR1"
HEADER = struct.Struct("<4sHHQ16s")
HEADER_SIZE = HEADER.size
DIGEST_SIZE = 16
LISTING_KEY_BYTES = 52  # kvproto.market.LISTING_KEY_BYTES: record key ‖ "@L" ‖ tag ‖ load id


def digest(key: bytes, payload: bytes | memoryview) -> bytes:
    """XXH3-128 of key ‖ payload (streamed: the payload is not copied). A listing key
    (kvproto.market) reads the publisher's record: its digest binds the record key inside it."""
    if len(key) == LISTING_KEY_BYTES and key[34:36] == b"@L":
        key = key[:34]
    h = xxhash.xxh3_128(key)
    h.update(payload)
    return h.digest()


def pack_header(size: int, record_digest: bytes) -> bytes:
    return HEADER.pack(MAGIC, VERSION, 0, size, record_digest)


def pack(key: bytes, payload: bytes | memoryview) -> bytes:
    """The stored value of `payload` under `key` (header + payload, one copy)."""
    return pack_header(len(payload), digest(key, payload)) + bytes(payload)


def check(key: bytes, payload: bytes | memoryview, record_digest: bytes) -> None:
    """Raise Corrupt unless `payload` is what was written under `key`."""
    if digest(key, payload) != record_digest:
        raise Corrupt(f"record {key.hex()[:16]} failed its checksum")


def unpack(key: bytes, stored: bytes | memoryview, verify: bool = True) -> tuple[memoryview, bytes]:
    """Split a stored value into (payload view, digest); raise Corrupt on any mismatch.

    `verify=False` checks the structure only; the caller then owes `check(key, payload, digest)`.
    """
    view = memoryview(stored)
    if len(view) < HEADER_SIZE:
        raise Corrupt("record shorter than its header")
    magic, version, flags, size, record_digest = HEADER.unpack_from(view)
    if magic != MAGIC or version != VERSION:
        raise Corrupt(f"bad record header (magic {bytes(magic)!r}, version {version})")
    if flags != 0:  # no writer sets flags: a flipped bit
        raise Corrupt("record header has unknown flags")
    payload = view[HEADER_SIZE:]
    if len(payload) != size:
        raise Corrupt(f"record length {len(payload)} != header {size}")
    if verify:
        check(key, payload, record_digest)
    return payload, record_digest


def prefix_length(present) -> int:
    """How many entries from the start are all true: the length of a cached prefix."""
    return next((i for i, p in enumerate(present) if not p), len(present))
