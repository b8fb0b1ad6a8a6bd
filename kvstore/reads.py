"""Reading a Storage: records (verified, or views for a reader that checks the digest), key
ranges, and what the store holds (tenant usage, live bytes, statistics).

A mixin of ``kvstore.storage.Storage``: it uses its environment, data database, guard and
evictor (reads remember what they touched for LRU, ``kvstore.eviction``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import lmdb

from kvproto import record
from kvproto.errors import Corrupt

T = TypeVar("T")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StorageStats:
    records: int
    used_bytes: int  # bytes of pages holding live data (freed pages are reused, not counted)
    map_size_bytes: int
    file_bytes: int = 0  # the high-water mark of the data file
    evicted_records: int = 0
    needs_rebuild: str = ""  # why the file must be rebuilt from the replicas; "" when sound


class Reads:
    """The read side of a Storage."""

    @contextmanager
    def _read_txn(self) -> Iterator[lmdb.Transaction]:
        """A read transaction over the data; a damaged page is DATA_LOSS, not INTERNAL."""
        self._usable()
        with self._guard(), self.env.begin(db=self.data_db, buffers=True) as txn:
            yield txn

    def exists(self, keys: list[bytes], tenant: bytes = b"") -> list[bool]:
        with self._read_txn() as txn:
            present = [txn.get(tenant + key) is not None for key in keys]
        self.evictor.touch(tenant, (k for k, p in zip(keys, present) if p))
        return present

    def read_with(self, key: bytes, use: Callable[[memoryview, bytes], T], tenant: bytes = b"",
                  verify: bool = True) -> T | None:
        """use(payload view, digest) of a record, inside the read transaction (the view dies with
        it, so `use` must copy what it keeps); None if missing; Corrupt if damaged. With
        `verify=False` only the structure is checked here: the reader checks the digest."""
        with self._read_txn() as txn:
            stored = txn.get(tenant + key)
            if stored is None:
                return None
            result = use(*record.unpack(key, stored, verify))
        self.evictor.touch(tenant, [key])
        return result

    def sizes(self, keys: list[bytes], tenant: bytes = b"") -> int:
        """Total payload bytes of the stored keys (no payload byte is touched)."""
        with self._read_txn() as txn:
            return sum(max(0, len(v) - record.HEADER_SIZE) for k in keys if (v := txn.get(tenant + k)) is not None)

    def read_batch(self, keys: list[bytes], sink: Callable[[list], None], tenant: bytes = b"",
                   verify: bool = True) -> list[bool]:
        """sink([(index, payload view, digest or None)]) of every readable key, in one read
        transaction and one batch (the views die when sink returns). A damaged record is
        logged and reported as not found. With `verify=False` the sink gets each digest to check."""
        found = [False] * len(keys)
        batch = []
        with self._read_txn() as txn:
            for i, key in enumerate(keys):
                try:
                    stored = txn.get(tenant + key)
                    if stored is None:
                        continue
                    payload, digest = record.unpack(key, stored, verify)
                except Corrupt as exc:
                    log.warning("corrupt record %s: %s", key.hex(), exc)
                    continue
                batch.append((i, payload, None if verify else digest))
                found[i] = True
            if batch:
                sink(batch)
        self.evictor.touch(tenant, (k for k, f in zip(keys, found) if f))
        return found

    def get(self, key: bytes, tenant: bytes = b"") -> bytes | None:
        """A verified record's payload (copied out), None if missing; Corrupt if damaged."""
        return self.read_with(key, lambda payload, _digest: bytes(payload), tenant)

    def scan(self, prefix: bytes, start_after: bytes, limit: int) -> list[bytes]:
        """Up to `limit` keys under `prefix`, in order, strictly after `start_after`."""
        out: list[bytes] = []
        self._usable()
        with self._guard(), self.env.begin(db=self.data_db) as txn:
            cursor = txn.cursor()
            if not cursor.set_range(max(prefix, start_after)):
                return out
            for key in cursor.iternext(keys=True, values=False):
                if not key.startswith(prefix) or len(out) >= limit:
                    break
                if key != start_after:
                    out.append(key)
        return out

    def count(self, prefix: bytes) -> int:
        """Records stored under a tenant prefix (a key-only walk of its range)."""
        self._usable()
        n = 0
        with self._guard(), self.env.begin(db=self.data_db) as txn:
            cursor = txn.cursor()
            if cursor.set_range(prefix):
                for key in cursor.iternext(keys=True, values=False):
                    if not key.startswith(prefix):
                        break
                    n += 1
        return n

    def tenant_usage(self, tenant: bytes = b"") -> int:
        """Bytes (keys + stored values) charged to a tenant."""
        self._usable()
        with self.env.begin() as txn:
            return self.ledger.usage(txn, tenant) if self.ledger else 0

    def map_size(self) -> int:
        return self._map_size

    def used_bytes(self) -> int:
        """Bytes of pages holding live data, over every database (freed pages not counted)."""
        with self.env.begin() as txn:
            stats = [txn.stat(db) for db in self._dbs]
        pages = sum(s["branch_pages"] + s["leaf_pages"] + s["overflow_pages"] for s in stats)
        return (pages + 2) * stats[0]["psize"]  # + the two meta pages

    def stats(self) -> StorageStats:
        if self.damaged or self.env is None:
            return StorageStats(0, 0, 0, needs_rebuild=self.damaged or "not open")
        info = self.env.info()
        with self._guard(), self.env.begin(db=self.data_db) as txn:
            records = txn.stat(self.data_db)["entries"]
        return StorageStats(
            records=records,
            used_bytes=self.used_bytes(),
            map_size_bytes=info["map_size"],
            file_bytes=(info["last_pgno"] + 1) * self.env.stat()["psize"],
            evicted_records=self.evictor.evicted_records,
        )
