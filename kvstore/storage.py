"""LMDB-backed record storage: one environment per process, checksummed records, atomic batches.

Each value is the record envelope of ``kvclient.record`` (header with XXH3-128 of the payload)
followed by the payload. A batch of records is committed in one write transaction, so a reader
sees all of it or none of it. Checksums are verified on every read.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
from collections.abc import Iterable
from dataclasses import dataclass

import lmdb

from kvclient import record
from kvclient.errors import Corrupt, QuotaExceeded

log = logging.getLogger(__name__)

DATA_DB = b"data"
META_DB = b"meta"
ENV_TOKEN = b"env_token"


@dataclass(frozen=True)
class IncomingRecord:
    key: bytes
    digest: bytes
    payload: bytes


@dataclass(frozen=True)
class StorageStats:
    records: int
    used_bytes: int
    map_size_bytes: int


class Storage:
    """A single LMDB environment holding records. Thread-safe: LMDB serialises writers."""

    def __init__(self, path: str, map_size: int, sync: bool = True, readonly: bool = False) -> None:
        self.path = os.path.abspath(path)
        if not readonly:
            os.makedirs(self.path, exist_ok=True)
        self.readonly = readonly
        self.env = lmdb.open(
            self.path,
            map_size=map_size,
            max_dbs=4,
            max_readers=512,
            readonly=readonly,
            sync=sync,
            metasync=sync,
            readahead=False,
            lock=True,  # readers must register, or a writer may reuse pages they still read
        )
        self._data = self.env.open_db(DATA_DB, create=not readonly)
        self._meta = self.env.open_db(META_DB, create=not readonly)
        self._write_lock = threading.Lock()
        self.env_token = self._load_env_token()

    def _load_env_token(self) -> bytes:
        with self.env.begin(db=self._meta) as txn:
            token = txn.get(ENV_TOKEN)
        if token is None and not self.readonly:
            with self.env.begin(db=self._meta, write=True) as txn:
                token = txn.get(ENV_TOKEN) or secrets.token_bytes(16)
                txn.put(ENV_TOKEN, token)
        return bytes(token or b"")

    # ---- writes -------------------------------------------------------------------------
    def put_batch(self, records: Iterable[IncomingRecord]) -> tuple[int, int]:
        """Store records atomically, first writer wins. Returns (stored, existed)."""
        stored = existed = 0
        try:
            with self._write_lock, self.env.begin(db=self._data, write=True) as txn:
                for rec in records:
                    value = record.pack_header(len(rec.payload), rec.digest) + rec.payload
                    if txn.put(rec.key, value, overwrite=False):
                        stored += 1
                    elif self._replace_if_corrupt(txn, rec.key, value):
                        stored += 1
                    else:
                        existed += 1
        except lmdb.MapFullError as exc:
            raise QuotaExceeded("store is full (LMDB map size reached)") from exc
        return stored, existed

    def _replace_if_corrupt(self, txn: lmdb.Transaction, key: bytes, value: bytes) -> bool:
        """First writer wins, except over a record that fails its checksum (repair)."""
        try:
            record.unpack(txn.get(key))
            return False
        except Corrupt:
            log.warning("replacing corrupt record %s", key.hex())
            txn.put(key, value)
            return True

    def delete(self, keys: Iterable[bytes]) -> int:
        with self._write_lock, self.env.begin(db=self._data, write=True) as txn:
            return sum(1 for key in keys if txn.delete(key))

    # ---- reads --------------------------------------------------------------------------
    def exists(self, keys: list[bytes]) -> list[bool]:
        with self.env.begin(db=self._data, buffers=True) as txn:
            return [txn.get(key) is not None for key in keys]

    def read_chunks(self, key: bytes, chunk_size: int) -> tuple[bytes, list[bytes]] | None:
        """(digest, payload chunks) of a verified record, None if missing; Corrupt if damaged.

        The chunks are copied out inside the read transaction: LMDB views die with it.
        """
        with self.env.begin(db=self._data, buffers=True) as txn:
            stored = txn.get(key)
            if stored is None:
                return None
            payload, digest = record.unpack(stored)
            chunks = [bytes(payload[i : i + chunk_size]) for i in range(0, len(payload), chunk_size)]
        return digest, chunks or [b""]

    def get(self, key: bytes) -> bytes | None:
        with self.env.begin(db=self._data, buffers=True) as txn:
            stored = txn.get(key)
            if stored is None:
                return None
            payload, _ = record.unpack(stored)
            return bytes(payload)

    def scan(self, prefix: bytes, start_after: bytes, limit: int) -> list[bytes]:
        """Up to `limit` keys under `prefix`, in order, strictly after `start_after`."""
        out: list[bytes] = []
        with self.env.begin(db=self._data) as txn:
            cursor = txn.cursor()
            if not cursor.set_range(max(prefix, start_after)):
                return out
            for key in cursor.iternext(keys=True, values=False):
                if not key.startswith(prefix) or len(out) >= limit:
                    break
                if key != start_after:
                    out.append(key)
        return out

    def stats(self) -> StorageStats:
        info = self.env.info()
        stat = self.env.stat()
        with self.env.begin(db=self._data) as txn:
            records = txn.stat(self._data)["entries"]
        used = (info["last_pgno"] + 1) * stat["psize"]
        return StorageStats(records=records, used_bytes=used, map_size_bytes=info["map_size"])

    def close(self) -> None:
        self.env.close()
