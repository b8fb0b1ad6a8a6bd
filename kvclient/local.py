"""In-process store with the Client interface: LMDB in this process, no network (benchmarks, tests)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from . import record
from .errors import Corrupt


class LocalStore:
    def __init__(self, path: str, map_size_gb: float = 8.0, sync: bool = False) -> None:
        from kvstore.storage import Storage  # the node's own storage engine, used in-process

        self.storage = Storage(path, int(map_size_gb * (1 << 30)), sync=sync)

    def put(self, key: bytes, value: bytes | memoryview) -> None:
        self.put_many([(key, value)])

    def put_many(self, items: Sequence[tuple[bytes, bytes | memoryview]]) -> None:
        from kvstore.storage import IncomingRecord

        self.storage.put_batch(IncomingRecord(k, record.checksum(v), bytes(v)) for k, v in items)

    def get(self, key: bytes) -> bytes | None:
        return self.get_many([key])[0]

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        out: list[bytes | None] = []
        for key in keys:
            try:
                out.append(self.storage.get(key))
            except Corrupt:
                out.append(None)
        return out

    def read_into(self, keys: Sequence[bytes], sink: Callable[[list[tuple[int, memoryview]]], None],
                  verify: bool = True) -> list[bool]:
        """sink([(index, payload view)]) for each stored key, inside its read transaction (the
        storage engine always verifies; `verify` is accepted for the Client's signature)."""
        found = []
        for i, key in enumerate(keys):
            try:
                found.append(self.storage.read_with(key, lambda view, _digest, i=i: sink([(i, view)]) or True) is not None)
            except Corrupt:
                found.append(False)
        return found

    def exists(self, keys: Sequence[bytes]) -> list[bool]:
        return self.storage.exists(list(keys))

    def lookup(self, keys: Sequence[bytes]) -> int:
        present = self.exists(keys)
        return record.prefix_length(present)

    def delete(self, keys: Sequence[bytes]) -> int:
        return self.storage.delete(keys)

    def close(self) -> None:
        self.storage.close()

    def __enter__(self) -> "LocalStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
