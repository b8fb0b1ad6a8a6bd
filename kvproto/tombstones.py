"""Tombstones: the durable trace of a delete that missed a replica (pure, no I/O).

A delete acknowledged while an owner was down leaves, on the owners that did delete, a small
record under ``tombstone_key(key)``. It sits at the key's own ring position (same owners), so a
read repair can ask the node it is about to write to whether the key was deleted, and the
anti-entropy pass (``healing.rebalance``) finds it by Scan and deletes the stale copies. Once
every owner has deleted the key the tombstones are removed.

Layout: the key's 8-byte ring position, a 8-byte marker, then the key itself, so the original
key is recovered from a scanned tombstone and checked against its position.
"""

from __future__ import annotations

from kvproto.limits import MAX_KEY_BYTES

from .ring import key_position

MARKER = b"\x00kvtomb\x01"
VALUE = b"deleted"
HEAD = 8 + len(MARKER)


def tombstone_key(key: bytes) -> bytes | None:
    """The tombstone record's key for `key` (None if it would exceed the key size limit)."""
    if len(key) + HEAD > MAX_KEY_BYTES:
        return None
    return key_position(key).to_bytes(8, "big") + MARKER + key


def deleted_key(stored: bytes) -> bytes | None:
    """The key a scanned tombstone stands for, or None if `stored` is not a tombstone."""
    if len(stored) <= HEAD or stored[8:HEAD] != MARKER:
        return None
    key = stored[HEAD:]
    return key if key_position(key).to_bytes(8, "big") == stored[:8] else None
