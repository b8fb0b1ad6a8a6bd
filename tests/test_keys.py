"""Key spec v1: the published test vectors, and an independent re-derivation with hashlib."""

from __future__ import annotations

import hashlib
import os
import struct

import pytest

from kvproto.keys import block_keys, namespace, record_key, tail_key

FINGERPRINT = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
TOKENS = [1, 2, 3, 4, 5, 6, 7, 8, 9, 4294967295]
SPEC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "key-spec.md")

# (salt, h0, h1, h2, tail) for TOKENS with block size 4, copied from docs/key-spec.md.
VECTORS_B4 = [
    (
        b"",
        "bf00979347b3b7d9331010a6b68d1a9a10144de67f493b6e660f8944a1d735aa",
        "c17fda51eb5cb536296d01f3b4f0ccabd0f0247fb981dc01deea3871481d84ce",
        "084c01964b5d92a2f818aa304cd13872523c2a99dfce1e2c3f05a6280cbe9c7e",
        "ab18d282b4b1c41b562ccc10bc68cf121de532caac54e66bfd9a278d3ff0a2c4",
    ),
    (
        b"tenant-a",
        "2527784405251740f05e33f2ea0855b62c4aa911d60121007f04d437aa3164eb",
        "46d076bec1a2b7a3052dfd12690eb31e3cfec3848e77b3a1fadb30a289491997",
        "fee47e921ac727613478f2b7dd6e2ae4ccdfc5d2b47b2f46e216216711d839b6",
        "6e711156c47d9399b1e3e9aec6dd000486266cff1103fb0adaac2009a8b0befa",
    ),
]
RECORD_H1_L0 = "c17fda51eb5cb536296d01f3b4f0ccabd0f0247fb981dc01deea3871481d84ce0000"
RECORD_H2_L513 = "084c01964b5d92a2f818aa304cd13872523c2a99dfce1e2c3f05a6280cbe9c7e0102"
B256_H1 = "bc5beb2072a9f165b8d9998b9a8d5f59430c72fff70d0ce74df3f2cf216bb550"
B256_H2 = "d43966ee598e34732eb17ca128de865d5139392c7183e6a6efd42e0495da9e7e"
B256_TAIL = "bbf7dda85006c41d829857a048fe03069523bc9284201120611b3cd9271175af"
TAIL_AFTER_H0 = "af04c4e2ab31fd637e933263fe30c610681d5a3271252bf0948c9dd7244c28fb"


def sha(*parts: bytes) -> bytes:
    return hashlib.sha256(b"".join(parts)).digest()


def u32(tokens: list[int]) -> bytes:
    return struct.pack(f"<{len(tokens)}I", *tokens)


@pytest.mark.parametrize("salt,h0,h1,h2,tail", VECTORS_B4)
def test_vectors_block_size_4(salt: bytes, h0: str, h1: str, h2: str, tail: str) -> None:
    ns = namespace(FINGERPRINT, salt)
    keys = block_keys(ns, TOKENS, 4)
    assert ns.hex() == h0
    assert [k.hex() for k in keys] == [h1, h2]
    assert tail_key(keys[-1], TOKENS[8:]).hex() == tail


@pytest.mark.parametrize("salt,h0,h1,h2,tail", VECTORS_B4)
def test_vectors_recomputed_with_hashlib(salt: bytes, h0: str, h1: str, h2: str, tail: str) -> None:
    root = sha(b"kvcache/v1", bytes.fromhex(FINGERPRINT), salt)
    first = sha(root, u32(TOKENS[:4]))
    second = sha(first, u32(TOKENS[4:8]))
    assert [root.hex(), first.hex(), second.hex()] == [h0, h1, h2]
    assert sha(second, b"tail", u32(TOKENS[8:])).hex() == tail


def test_record_keys() -> None:
    keys = block_keys(namespace(FINGERPRINT), TOKENS, 4)
    assert record_key(keys[0], 0).hex() == RECORD_H1_L0
    assert record_key(keys[1], 513).hex() == RECORD_H2_L513
    assert record_key(keys[1], 513) == keys[1] + bytes([1, 2])


def test_vectors_default_block_size() -> None:
    ns = namespace(FINGERPRINT, b"tenant-a")
    tokens = list(range(600))
    keys = block_keys(ns, tokens)
    assert [k.hex() for k in keys] == [B256_H1, B256_H2]
    assert tail_key(keys[-1], tokens[512:]).hex() == B256_TAIL
    assert tail_key(ns, [42, 7]).hex() == TAIL_AFTER_H0
    first = sha(ns, u32(tokens[:256]))
    assert first.hex() == B256_H1
    assert sha(sha(first, u32(tokens[256:512])), b"tail", u32(tokens[512:])).hex() == B256_TAIL


def test_vectors_are_the_published_ones() -> None:
    with open(SPEC, encoding="utf-8") as f:
        spec = f.read()
    published = [v for row in VECTORS_B4 for v in row[1:]]
    published += [RECORD_H1_L0, RECORD_H2_L513, B256_H1, B256_H2, B256_TAIL, TAIL_AFTER_H0, FINGERPRINT]
    for value in published:
        assert value in spec


def test_chain_properties() -> None:
    ns = namespace(FINGERPRINT)
    tokens = list(range(1000))
    keys = block_keys(ns, tokens, 256)
    assert len(keys) == 3  # full blocks only
    assert block_keys(ns, tokens[:512], 256) == keys[:2]  # a prefix's keys are a prefix
    changed = tokens[:300] + [7] + tokens[301:]
    assert block_keys(ns, changed, 256)[0] == keys[0]
    assert block_keys(ns, changed, 256)[1:] != keys[1:]  # a change poisons every later block
    assert namespace(FINGERPRINT, b"a") != namespace(FINGERPRINT, b"b")
    assert block_keys(ns, [], 256) == [] and block_keys(ns, tokens[:255], 256) == []


def test_accepts_numpy_and_torch_tokens() -> None:
    import numpy as np
    import torch

    ns = namespace(FINGERPRINT)
    expected = block_keys(ns, TOKENS, 4)
    assert block_keys(ns, np.array(TOKENS, dtype=np.int64), 4) == expected
    assert block_keys(ns, torch.tensor(TOKENS, dtype=torch.int64), 4) == expected


@pytest.mark.parametrize("bad", [[-1, 2, 3, 4], [2**32, 1, 2, 3]])
def test_rejects_tokens_outside_uint32(bad: list[int]) -> None:
    with pytest.raises(ValueError):
        block_keys(namespace(FINGERPRINT), bad, 4)


def test_rejects_bad_block_size() -> None:
    with pytest.raises(ValueError):
        block_keys(namespace(FINGERPRINT), TOKENS, 0)
