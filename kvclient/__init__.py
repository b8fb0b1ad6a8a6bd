"""Client library of the distributed KV-cache store."""

from .client import Client
from kvproto.errors import Corrupt, InvalidArgument, KVCacheError, NotFound, QuotaExceeded, Unavailable
from kvproto.keys import block_keys, namespace, record_key, tail_key
from .ring import HashRing

__all__ = [
    "Client",
    "Corrupt",
    "HashRing",
    "InvalidArgument",
    "KVCacheError",
    "NotFound",
    "QuotaExceeded",
    "Unavailable",
    "block_keys",
    "namespace",
    "record_key",
    "tail_key",
]
