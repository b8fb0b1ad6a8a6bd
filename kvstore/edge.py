"""Edge copies on a node: records it holds without owning them (a reader's copy of a remote
block, or what a join left behind) are evicted before the records it owns.

Ownership is the ring's answer for the node's current membership (``kvstore.agent`` keeps the
ring), so nothing marks a record as an edge copy: a node that becomes an owner of a key makes its
copy an owned one, and the other way round. Least recently used first within each class.
"""

from __future__ import annotations

from collections.abc import Callable

from kvproto.ring import HashRing, key_position

from .ledger import split_group


def owned_here(ring: Callable[[], tuple[HashRing, int] | None], address: str) -> Callable[[bytes], bool]:
    """group id -> whether this node owns it under the current ring (True with no ring yet)."""

    def owned(gid: bytes) -> bool:
        current = ring()
        if current is None:
            return True
        hashring, replication = current
        _tenant, kind, body = split_group(gid)
        probe = body[:8] if kind == b"B" else key_position(body).to_bytes(8, "big")
        return address in hashring.owners(probe, replication)

    return owned
