"""Key spec v1: how a token prefix becomes storage keys (see docs/key-spec.md; it is the contract).

Pure functions, no I/O. Every client in every language must reproduce these bytes exactly.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

import numpy as np

SPEC_TAG = b"kvcache/v1"
DEFAULT_BLOCK_SIZE = 256
LAYER_SUFFIX = struct.Struct("<H")


def namespace(fingerprint_hex: str, tenant_salt: bytes = b"") -> bytes:
    """h_0 = SHA-256("kvcache/v1" ‖ fingerprint bytes ‖ tenant salt)."""
    return hashlib.sha256(SPEC_TAG + bytes.fromhex(fingerprint_hex) + tenant_salt).digest()


def _token_bytes(tokens: Sequence[int]) -> bytes:
    arr = np.asarray(tokens, dtype=np.int64)
    if arr.size and (arr.min() < 0 or arr.max() > 0xFFFFFFFF):
        raise ValueError("token ids must fit in uint32")
    return arr.astype("<u4").tobytes()


def block_keys(namespace: bytes, token_ids: Sequence[int], block_size: int = DEFAULT_BLOCK_SIZE) -> list[bytes]:
    """One key per *full* block: h_i = SHA-256(h_{i-1} ‖ block i's tokens as uint32 LE)."""
    if block_size <= 0:
        raise ValueError("block_size must be positive")
    raw = _token_bytes(token_ids)
    step = 4 * block_size
    keys: list[bytes] = []
    prev = namespace
    for start in range(0, len(raw) - step + 1, step):
        prev = hashlib.sha256(prev + raw[start : start + step]).digest()
        keys.append(prev)
    return keys


def tail_key(prev: bytes, tail_tokens: Sequence[int]) -> bytes:
    """Key of the last, partial block: SHA-256(h_prev ‖ "tail" ‖ its tokens as uint32 LE)."""
    return hashlib.sha256(prev + b"tail" + _token_bytes(tail_tokens)).digest()


def record_key(block_key: bytes, layer: int) -> bytes:
    """Storage key of one (block, layer) record: h_i ‖ uint16 LE layer index."""
    return block_key + LAYER_SUFFIX.pack(layer)
