"""The stored record envelope: a fixed, versioned header with the checksum of the raw bytes.

Layout (little-endian, 32 bytes): magic b"KVR1" | version u16 | flags u16 | raw length u64 |
XXH3-128 digest (16 bytes, big-endian as xxhash gives it). The payload follows.
"""

from __future__ import annotations

import struct

import xxhash

from .errors import Corrupt

# The node's LMDB layout, shared with co-located readers: named databases and the meta key that
# identifies an environment (the co-located path checks it against the node's LocalInfo).
DATA_DB = b"data"
META_DB = b"meta"
ENV_TOKEN = b"env_token"

MAGIC = b"KVR1"
VERSION = 1
HEADER = struct.Struct("<4sHHQ16s")
HEADER_SIZE = HEADER.size
CHECKSUM_SIZE = 16


def checksum(data: bytes | memoryview) -> bytes:
    return xxhash.xxh3_128_digest(data)


def pack_header(size: int, digest: bytes) -> bytes:
    return HEADER.pack(MAGIC, VERSION, 0, size, digest)


def unpack(stored: bytes | memoryview, verify: bool = True) -> tuple[memoryview, bytes]:
    """Split a stored value into (payload view, digest); raise Corrupt on any mismatch."""
    view = memoryview(stored)
    if len(view) < HEADER_SIZE:
        raise Corrupt("record shorter than its header")
    magic, version, flags, size, digest = HEADER.unpack_from(view)
    if magic != MAGIC or version != VERSION:
        raise Corrupt(f"bad record header (magic {bytes(magic)!r}, version {version})")
    if flags != 0:  # no writer sets flags: a flipped bit
        raise Corrupt("record header has unknown flags")
    payload = view[HEADER_SIZE:]
    if len(payload) != size:
        raise Corrupt(f"record length {len(payload)} != header {size}")
    if verify and checksum(payload) != digest:
        raise Corrupt("record checksum mismatch")
    return payload, digest


def prefix_length(present) -> int:
    """How many entries from the start are all true: the length of a cached prefix."""
    return next((i for i, p in enumerate(present) if not p), len(present))
