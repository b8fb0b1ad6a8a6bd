"""Tombstones live in ``kvproto.tombstones`` (nodes' rebalancers honour them too); re-exported."""

from kvproto.tombstones import HEAD, MARKER, VALUE, deleted_key, tombstone_key

__all__ = ["HEAD", "MARKER", "VALUE", "deleted_key", "tombstone_key"]
