"""Durable hints: the record of a write that missed a replica, kept on a node that took it (pure).

A client whose write reached the quorum but not every owner puts, on one owner that stored the
record, a small record under ``hint_key(target, key)``. That node's hint agent
(``kvstore.hints``) finds it by a prefix scan, sends its own copy of the record to `target` once
it answers, and deletes the hint: delivery needs neither the client nor its memory.

Layout: PREFIX, the target's address, a NUL, then the key. The prefix keeps every hint in one
range of the node's database (one cheap scan); clients' repair passes skip it (``is_hint``).
A client on an auth node writes its hints with its own token like any record, so the node
stores them under the tenant's prefix: the node scans PREFIX under each tenant's prefix and
parses what follows it; `key` is always the client's key, without any prefix.
"""

from __future__ import annotations

from .limits import MAX_KEY_BYTES

PREFIX = b"\x00kvhint\x01"
VALUE = b"hint"


def hint_key(target: str, key: bytes) -> bytes | None:
    """The hint record's key for `key` owed to `target` (None if over the key size limit)."""
    stored = PREFIX + target.encode() + b"\x00" + key
    return stored if len(stored) <= MAX_KEY_BYTES else None


def is_hint(stored: bytes) -> bool:
    return stored.startswith(PREFIX)


def parse_hint(stored: bytes) -> tuple[str, bytes] | None:
    """(target address, key) of a scanned hint, or None if `stored` is not one."""
    if not is_hint(stored):
        return None
    target, sep, key = stored[len(PREFIX):].partition(b"\x00")
    if not sep or not key:
        return None
    try:
        return target.decode(), key
    except UnicodeDecodeError:
        return None
