"""In-process store: the node's own LMDB storage engine in this process, no network.

Implements ``kvproto.store.Store`` (benchmarks, tests, single-process services).
"""

from __future__ import annotations

from collections.abc import Sequence

from kvproto import record
from kvproto.store import Sink, copy_out

from .storage import IncomingRecord, Storage


class LocalStore:
    def __init__(self, path: str, map_size_gb: float = 8.0, sync: bool = False) -> None:
        self.storage = Storage(path, int(map_size_gb * (1 << 30)), sync=sync)

    def put(self, key: bytes, value: bytes | memoryview) -> None:
        self.put_many([(key, value)])

    def put_many(self, items: Sequence[tuple[bytes, bytes | memoryview]]) -> None:
        self.storage.put_batch(IncomingRecord.of(key, value) for key, value in items)

    def get(self, key: bytes) -> bytes | None:
        return self.get_many([key])[0]

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        return copy_out(self, list(keys))

    def read_into(self, keys: Sequence[bytes], sink: Sink, verify: bool = True) -> list[bool]:
        """One read transaction, one batch: views of the map, valid until `sink` returns."""
        return self.storage.read_batch(list(keys), sink, verify=verify)

    def exists(self, keys: Sequence[bytes]) -> list[bool]:
        return self.storage.exists(list(keys))

    def lookup(self, keys: Sequence[bytes]) -> int:
        return record.prefix_length(self.exists(keys))

    def delete(self, keys: Sequence[bytes]) -> int:
        return self.storage.delete(keys)

    def close(self) -> None:
        self.storage.close()

    def __enter__(self) -> "LocalStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
