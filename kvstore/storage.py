"""LMDB-backed record storage: one environment per process, checksummed records, atomic batches.

Each value is the record of ``kvproto.record`` (header with the XXH3-128 of key ‖ payload)
followed by the payload. A batch of records is committed in one write transaction, so a reader
sees all of it or none of it. Records are verified on receipt (the servicer) and by the reader:
in-process reads verify here, gRPC reads check the structure here and the digest in the client.

Records live under their tenant's prefix (``b""`` without auth). The ledger of
``kvstore.ledger`` (size and last access per block, bytes per tenant) is updated in the same write
transactions as the records; ``kvstore.eviction`` decides what to evict around each write.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import lmdb

from kvproto import record
from kvproto.errors import Corrupt, QuotaExceeded
from kvproto.integrity import data_file, file_check

from . import datadir, scrub
from .eviction import EVICTED, Evictor
from .ledger import COUNT, Changes, Ledger, group_id
from .reads import Reads
from .upkeep import DISK_RESERVE, Upkeep

log = logging.getLogger(__name__)

DATA_DB, META_DB, ENV_TOKEN, FORMAT_KEY = record.DATA_DB, record.META_DB, record.ENV_TOKEN, record.FORMAT_KEY
LEDGER_VERSION = b"ledger_version"
SETTLE_KEY = b"settled_at"
WRITE_ATTEMPTS = 4


class FormatError(ValueError):
    """The files hold records of a format this node does not read (one line, names the fix)."""


@dataclass(frozen=True)
class IncomingRecord:
    key: bytes
    digest: bytes  # kvproto.record.digest(key, payload), already checked
    payload: bytes | memoryview
    envelope: bytes | None = None  # header + payload already joined (payload is a view into it)

    @classmethod
    def of(cls, key: bytes, payload: bytes | memoryview) -> "IncomingRecord":
        """A record made in this process (its digest computed here, once)."""
        return cls(key, record.digest(key, payload), payload)

    @classmethod
    def from_parts(cls, key: bytes, digest: bytes, size: int, parts: list[bytes]) -> "IncomingRecord":
        """Join the envelope header and the received chunks in one copy."""
        envelope = b"".join([record.pack_header(size, digest), *parts])
        return cls(key, digest, memoryview(envelope)[record.HEADER_SIZE :], envelope)

    def stored_value(self) -> bytes:
        return self.envelope if self.envelope is not None else record.pack_header(len(self.payload), self.digest) + bytes(self.payload)


class Storage(Upkeep, Reads):
    """A single LMDB environment holding records. Thread-safe: one writer at a time."""

    def __init__(
        self,
        path: str,
        map_size: int,
        sync: bool = True,
        readonly: bool = False,
        *,
        high_water: float = 1.0,
        tenant_quota: int | None = None,
        clock: Callable[[], int] = time.time_ns,
        shared: bool = False,
        holder: str = "",
        scrub_seconds: float | None = None,
    ) -> None:
        if not path:
            raise datadir.DataDirError("the data directory is empty: name one")
        self.path = os.path.abspath(path)
        self.readonly = readonly
        self.clock = clock
        self.write_lock = threading.Lock()
        self.damaged: str | None = None  # why the file needs a rebuild; then nothing is read from it
        self.env: lmdb.Environment | None = None
        self.ledger: Ledger | None = None
        self.env_token = b""
        self.evictor = Evictor(self, high_water, tenant_quota)
        self._lock: datadir.DirLock | None = None
        self._stop = threading.Event()
        self._maintenance: threading.Thread | None = None
        file_mode = 0o600
        if not readonly:
            file_mode = datadir.prepare(self.path, shared)
            self._lock = datadir.DirLock(self.path, holder, file_mode)
        try:
            if os.path.exists(data_file(self.path)):
                self.damaged = file_check(self.path) or self._scrub_reason(scrub.run(self.path))
            if self.damaged:
                log.error("%s needs a rebuild, serving nothing from it: %s "
                          "(copy it back from the replicas: `kvstore rebuild --data %s --from NODES`)",
                          self.path, self.damaged, self.path)
            else:
                self._open(map_size, sync, file_mode)
        except BaseException:
            if self.env is not None:
                self.env.close()
            self._release_lock()
            raise
        self._maintenance = threading.Thread(target=self._maintain, args=(scrub_seconds,),
                                             name="kvstore-maintenance", daemon=True)
        self._maintenance.start()

    def _open(self, map_size: int, sync: bool, file_mode: int) -> None:
        readonly = self.readonly
        try:
            self.env = lmdb.open(
                self.path,
                map_size=map_size,
                max_dbs=8,
                max_readers=512,
                readonly=readonly,
                sync=sync,
                metasync=sync,
                readahead=False,
                lock=True,  # readers must register, or a writer may reuse pages they still read
                mode=file_mode,
            )
        except lmdb.MemoryError as exc:
            raise ValueError(f"cannot map {map_size / (1 << 30):g} GiB for {self.path} ({exc}): "
                             f"choose a smaller --map-size-gb") from exc
        self._map_size = self.env.info()["map_size"]  # fixed for the life of the environment
        with self._guard():
            self.data_db = self.env.open_db(DATA_DB, create=not readonly)
            self.meta_db = self.env.open_db(META_DB, create=not readonly)
            self._dbs = [self.env.open_db(None), self.data_db, self.meta_db]
            self.env_token = self._load_env_token()
            self._check_format()
            if not readonly:
                self.ledger = Ledger(self.env, self.data_db)
                self._dbs += [self.ledger.lru, self.ledger.usage_db]
                self.evictor.start(self._open_ledger())

    def _load_env_token(self) -> bytes:
        with self.env.begin(db=self.meta_db) as txn:
            token = txn.get(ENV_TOKEN)
        if token is None and not self.readonly:
            with self.env.begin(db=self.meta_db, write=True) as txn:
                token = txn.get(ENV_TOKEN) or secrets.token_bytes(16)
                txn.put(ENV_TOKEN, token)
        return bytes(token or b"")

    def _check_format(self) -> None:
        """Refuse files of another record format (never serve them as silent misses)."""
        with self.env.begin() as txn:
            found = txn.get(FORMAT_KEY, db=self.meta_db)
            empty = txn.stat(self.data_db)["entries"] == 0
        current = str(record.VERSION).encode()
        if found == current or (found is None and empty and self.readonly):
            return
        if found is None and empty and not self.readonly:
            with self.env.begin(db=self.meta_db, write=True) as txn:
                txn.put(FORMAT_KEY, current)
            return
        if found is None:
            self.env.close()
            raise FormatError(f"{self.path} holds records of format 1 (KVR1); "
                              f"convert them with `kvstore migrate --data {self.path}`")
        self.env.close()
        raise FormatError(f"{self.path} holds records of format {found.decode(errors='replace')}, "
                          f"this node reads format {record.VERSION}")

    def _open_ledger(self) -> int:
        """Build the ledger of a store written before it existed; the lifetime eviction count."""
        with self.env.begin(write=True) as txn:
            if txn.get(LEDGER_VERSION, db=self.meta_db) is None:
                count = self.ledger.rebuild(txn, self.clock())
                txn.put(LEDGER_VERSION, b"1", db=self.meta_db)
                if count:
                    log.info("built the eviction ledger for %d existing records", count)
            raw = txn.get(EVICTED, db=self.meta_db)
        return COUNT.unpack(raw)[0] if raw else 0

    # ---- writes -------------------------------------------------------------------------
    def put_batch(self, records: Iterable[IncomingRecord], tenant: bytes = b"") -> tuple[int, int]:
        """Store records atomically, first writer wins. Returns (stored, existed)."""
        self._usable()
        records = list(records)
        groups = {group_id(tenant, rec.key) for rec in records}
        with self.write_lock, self._guard():
            self._check_disk(records, tenant)
            self.evictor.make_room(records, tenant, groups)
            result = self._write_making_room(records, tenant, groups)
            try:
                self.evictor.after_write(groups)
            except lmdb.MapFullError as exc:  # the batch is stored; the next write evicts again
                log.warning("eviction after a write failed: %s", exc)
        return result

    def _write_making_room(self, records: list[IncomingRecord], tenant: bytes, groups: set[bytes]) -> tuple[int, int]:
        """Write; on a full map or disk, clear dead readers' slots or evict, and try again. Freed
        pages come in scattered runs, so a big record may need a few rounds."""
        for attempt in range(WRITE_ATTEMPTS):
            try:
                return self._write(records, tenant)
            except lmdb.MapFullError:
                if attempt + 1 == WRITE_ATTEMPTS:
                    raise
                if not self.reap_readers() and not self.evictor.after_map_full(records, tenant, groups):
                    raise
            except lmdb.Error:
                if attempt + 1 == WRITE_ATTEMPTS or self.disk_free() >= DISK_RESERVE:
                    raise
                if not self.evictor.after_map_full(records, tenant, groups):
                    raise
        raise AssertionError("unreachable")

    def _check_disk(self, records: list[IncomingRecord], tenant: bytes) -> None:
        """Refuse up front a write the disk cannot take (without eviction to make room): a
        commit that fails half-way would grow the file for nothing."""
        if self.evictor.by_space:
            return  # eviction keeps the file under capacity(), which counts the free disk
        incoming = self.evictor.incoming_pages(records, tenant)
        stats = self.env.info(), self.env.stat()["psize"]
        file_hw = (stats[0]["last_pgno"] + 1) * stats[1]
        free_in_file = max(0, file_hw - self.used_bytes())
        if incoming > free_in_file + self.disk_free() - DISK_RESERVE:
            raise QuotaExceeded(f"disk full under {self.path}: {self.disk_free()} bytes free, "
                                f"a write of {incoming} bytes does not fit (delete or evict records)")

    def _write(self, records: list[IncomingRecord], tenant: bytes) -> tuple[int, int]:
        stored = existed = 0
        changes = Changes()
        quota = self.evictor.tenant_quota
        with self.env.begin(db=self.data_db, write=True, buffers=True) as txn:
            for rec in records:
                key = tenant + rec.key
                value = rec.stored_value()
                if txn.put(key, value, overwrite=False):
                    stored += 1
                    changes.add(tenant, rec.key, len(key) + len(value))
                    continue
                replaced = self._replace_if_corrupt(txn, rec.key, key, value)
                if replaced is None:
                    existed += 1
                    changes.touch(tenant, rec.key)
                else:
                    stored += 1
                    changes.add(tenant, rec.key, len(value) - replaced)
            self.ledger.apply(txn, changes, self.clock())
            if quota is not None and changes.tenants.get(tenant, 0) > 0:
                used = self.ledger.usage(txn, tenant)
                if used > quota:  # raising aborts the transaction: nothing of the batch stays
                    raise QuotaExceeded(f"tenant quota of {quota} bytes exceeded ({used})")
        return stored, existed

    def _replace_if_corrupt(self, txn: lmdb.Transaction, key: bytes, stored_key: bytes, value: bytes) -> int | None:
        """First writer wins, except over a record that fails its checksum (repair), including
        one whose bytes are intact but belong to another key.

        Returns the length of the replaced value, None if the stored record stays."""
        old = txn.get(stored_key)
        try:
            record.unpack(key, old)
            return None
        except Corrupt:
            log.warning("replacing corrupt record %s", key.hex())
            size = len(old)
            txn.put(stored_key, value)
            return size

    def delete(self, keys: Iterable[bytes], tenant: bytes = b"") -> int:
        self._usable()
        changes = Changes()
        deleted = 0
        with self.write_lock, self._guard():
            with self.env.begin(db=self.data_db, write=True, buffers=True) as txn:
                for key in keys:
                    old = txn.pop(tenant + key)
                    if old is not None:
                        changes.add(tenant, key, -(len(tenant) + len(key) + len(old)), access=False)
                        deleted += 1
                self.ledger.apply(txn, changes, self.clock())
            if deleted:
                self._settle()
        return deleted

    def _settle(self) -> None:
        """One more small commit: LMDB reuses the pages a transaction freed only after the next
        one, and a full disk needs them at once."""
        with self.env.begin(db=self.meta_db, write=True) as txn:
            txn.put(SETTLE_KEY, COUNT.pack(self.clock()))

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def close(self) -> None:
        self._stop.set()
        if self._maintenance is not None and self._maintenance is not threading.current_thread():
            self._maintenance.join()
        self.evictor.stop()
        if self.env is not None:
            self.env.close()
        self._release_lock()
