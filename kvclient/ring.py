"""The ring lives in ``kvproto.ring`` (nodes place keys with it too); re-exported here."""

from kvproto.ring import DEFAULT_VNODES, MAX_VNODES, HashRing, key_position

__all__ = ["DEFAULT_VNODES", "MAX_VNODES", "HashRing", "key_position"]
