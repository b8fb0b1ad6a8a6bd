"""The typed store interface: what the in-process store, the gRPC client and the co-located
reader all implement, and what the prefix loader is written against (one loader, any store).

`tests/test_store_contract.py` is the one contract suite every implementation passes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

# (index of the key, payload view, digest the sink still owes a check of, or None when the store
# verified the record itself). Views are valid only until the sink returns.
Batch = list[tuple[int, memoryview, bytes | None]]
Sink = Callable[[Batch], None]


@runtime_checkable
class Store(Protocol):
    def lookup(self, keys: Sequence[bytes]) -> int:
        """Length of the longest prefix of `keys` that is stored."""

    def exists(self, keys: Sequence[bytes]) -> list[bool]:
        """Which keys are stored (an authoritative answer; raises only when no replica answered)."""

    def read_into(self, keys: Sequence[bytes], sink: Sink, verify: bool = True) -> list[bool]:
        """Hand the stored keys' payloads to `sink` in batches; returns which keys were found.

        With `verify=False` a store may pass a record's digest along instead of checking it,
        so the sink can hash the bytes where it copies them (``kvproto.record.check``)."""

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        """Payloads in key order (bytes, or bytearray as received off a socket), None for a miss."""

    def put_many(self, items: Sequence[tuple[bytes, bytes | memoryview]]) -> None:
        """Store records; the records one node receives commit atomically (first writer wins)."""

    def delete(self, keys: Sequence[bytes]) -> int:
        """Remove records; how many were removed."""

    def close(self) -> None: ...


def copy_out(store: Store, keys: Sequence[bytes]) -> list[bytes | None]:
    """get_many in terms of read_into: each found payload copied out of its view once."""
    results: list[bytes | None] = [None] * len(keys)

    def keep(batch: Batch) -> None:
        for i, view, _ in batch:
            results[i] = bytes(view)

    store.read_into(keys, keep)
    return results
