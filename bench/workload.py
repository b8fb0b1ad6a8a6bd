"""The bytes a benchmark moves: one document's KV laid out as the store lays it out (DESIGN §3),
one record per (block, layer), keys from the key spec. Deterministic, so a put in one process and a
fetch in another agree on keys and sizes without sharing anything but the parameters."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from kvproto.keys import DEFAULT_BLOCK_SIZE, block_keys, namespace, record_key, tail_key

from .economics import QWEN3_4B, KVShape


@dataclass(frozen=True)
class Document:
    tokens: int
    shape: KVShape = QWEN3_4B
    block_size: int = DEFAULT_BLOCK_SIZE
    seed: int = 0

    def token_ids(self) -> list[int]:
        rng = np.random.default_rng(self.seed)
        return rng.integers(0, 150_000, size=self.tokens).tolist()

    def records(self) -> list[tuple[bytes, int]]:
        """(key, payload size) per record: full blocks, then the tail block, layer by layer."""
        ids = self.token_ids()
        h0 = namespace(hashlib.sha256(f"kvbench-{self.seed}".encode()).hexdigest())
        blocks = block_keys(h0, ids, self.block_size)
        per_token_layer = self.shape.bytes_per_token // self.shape.layers
        out = [(record_key(b, layer), self.block_size * per_token_layer)
               for b in blocks for layer in range(self.shape.layers)]
        rest = self.tokens - len(blocks) * self.block_size
        if rest:
            tail = tail_key(blocks[-1] if blocks else h0, ids[-rest:])
            out += [(record_key(tail, layer), rest * per_token_layer) for layer in range(self.shape.layers)]
        return out

    @property
    def nbytes(self) -> int:
        return self.tokens * self.shape.bytes_per_token


def payload(size: int, seed: int = 0) -> bytes:
    """Incompressible bytes (random), so no layer can cheat with compression."""
    return np.random.default_rng(seed).bytes(size)
