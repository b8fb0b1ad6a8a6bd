"""Eviction policy: keep the store under its high-water mark and each tenant under its quota.

Above ``high_water`` × map size (live pages, see ``Storage.used_bytes``), least-recently-used
whole groups (all layers of a block; see ``kvstore.ledger``) of any tenant are evicted down to
``LOW_WATER`` × that mark. A tenant whose write would pass its quota has its *own*
least-recently-used groups evicted to make room, never another tenant's; if that cannot free
enough (the batch alone exceeds the quota) the write fails with RESOURCE_EXHAUSTED. The groups
a write is storing into are never its victims.

Reads do not write: they remember which groups they touched, and those accesses reach the ledger
within ``FLUSH_SECONDS`` (a background thread) and always before victims are chosen. Co-located
readers that map the LMDB file themselves are not seen; their Lookup calls are.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import lmdb

from kvproto import record
from kvproto.errors import QuotaExceeded

from .ledger import COUNT, group_id, page_bytes

if TYPE_CHECKING:
    from .storage import IncomingRecord, Storage

log = logging.getLogger(__name__)

LOW_WATER = 0.8  # evict down to this fraction of the high-water mark
FLUSH_SECONDS = 1.0
EVICT_ROUNDS = 4
EVICTED = b"evicted_records"


class Evictor:
    """The eviction side of one Storage. Callers of the write paths hold its write lock."""

    def __init__(self, storage: "Storage", high_water: float, tenant_quota: int | None) -> None:
        if not 0.0 < high_water:
            raise ValueError(f"high water must be a fraction above 0, got {high_water}")
        if tenant_quota is not None and tenant_quota <= 0:
            raise ValueError(f"tenant quota must be positive, got {tenant_quota}")
        self.storage = storage
        self.high_water = high_water
        self.tenant_quota = tenant_quota
        self.on_evict: Callable[[int], None] | None = None
        self.keep_first: Callable[[bytes], bool] | None = None  # group id -> owned here (kvstore.edge)
        self.evicted_records = 0
        self._touch_lock = threading.Lock()
        self._touched: dict[bytes, int] = {}
        self._stop = threading.Event()
        self._flusher: threading.Thread | None = None

    @property
    def by_space(self) -> bool:
        return self.high_water < 1.0

    @property
    def tracking(self) -> bool:
        """Whether read accesses matter: only eviction orders by them."""
        return self.by_space or self.tenant_quota is not None

    def start(self, evicted_records: int) -> None:
        self.evicted_records = evicted_records
        if self.tracking:
            self._flusher = threading.Thread(target=self._flush_loop, name="kvstore-lru", daemon=True)
            self._flusher.start()

    def _limit(self) -> float:
        return self.high_water * self.storage.capacity()

    def incoming_pages(self, records: Iterable["IncomingRecord"], tenant: bytes) -> int:
        return sum(page_bytes(len(tenant) + len(r.key), record.HEADER_SIZE + len(r.payload)) for r in records)

    # ---- around a write -----------------------------------------------------------------
    def make_room(self, records: list["IncomingRecord"], tenant: bytes, groups: set[bytes]) -> None:
        """Before a write: room under the tenant's quota, and under high water for the batch."""
        if not self.tracking:
            return
        s = self.storage
        with s.env.begin(buffers=True) as txn:
            new = [r for r in records if txn.get(tenant + r.key, db=s.data_db) is None]
            used = s.ledger.usage(txn, tenant)
        quota = self.tenant_quota
        incoming = sum(len(tenant) + len(r.key) + record.HEADER_SIZE + len(r.payload) for r in new)
        if quota is not None and used + incoming > quota:
            if incoming > quota:
                raise QuotaExceeded(f"{incoming} bytes exceed the tenant quota of {quota} bytes")
            over = used + incoming - quota
            if self.evict(over, tenant, groups, all_or_nothing=True)[1] < over:
                raise QuotaExceeded(f"tenant quota of {quota} bytes reached")
        if self.by_space:
            pages = self.incoming_pages(new, tenant)
            if pages > LOW_WATER * self._limit():  # would flush the whole cache, and still not fit
                raise QuotaExceeded(f"a put of {pages} bytes cannot fit under the high-water mark")
            if s.used_bytes() + pages > self._limit():
                self.evict_to(LOW_WATER * self._limit() - pages, groups)

    def after_write(self, groups: set[bytes]) -> None:
        if self.by_space and self.storage.used_bytes() > self._limit():
            self.evict_to(LOW_WATER * self._limit(), groups)

    def after_map_full(self, records: list["IncomingRecord"], tenant: bytes, groups: set[bytes]) -> bool:
        """The map was full anyway (pages of the last commit not yet reusable, or scattered free
        runs): evict twice the batch beyond the low-water mark. False if eviction is off."""
        if not self.by_space:
            return False
        need = 2 * self.incoming_pages(records, tenant)
        self.evict_to(min(self.storage.used_bytes(), LOW_WATER * self._limit()) - need, groups)
        return True

    # ---- eviction -----------------------------------------------------------------------
    def evict_to(self, target: float, exclude: set[bytes]) -> None:
        """Evict least-recently-used groups until live pages take at most `target` bytes."""
        for _ in range(EVICT_ROUNDS):
            used = self.storage.used_bytes()
            if used <= target or self.evict(int(used - target), None, exclude)[0] == 0:
                return

    def evict(
        self, need: int, tenant: bytes | None, exclude: set[bytes], all_or_nothing: bool = False
    ) -> tuple[int, int]:
        """Evict the oldest whole groups worth at least `need` bytes (of one tenant if given);
        with `all_or_nothing`, evict none unless that much can go.

        One transaction removes them; a second makes their pages reusable by the next write
        (LMDB reuses only pages freed by transactions older than the previous one)."""
        s = self.storage
        s.reap_readers()  # pages pinned by a dead reader are not a reason to evict
        with s.env.begin(write=True, buffers=True) as txn:
            s.ledger.touch(txn, self.take_touched())
            victims: list[bytes] = []
            planned = 0
            oldest = s.ledger.oldest(txn, tenant, exclude)
            if self.keep_first is not None:  # edge copies (not owned here) go before owned groups
                oldest.sort(key=lambda entry: self.keep_first(entry[1]))  # stable: LRU within each class
            for _last, gid, size in oldest:
                if planned >= need:
                    break
                victims.append(gid)
                planned += size
            if all_or_nothing and planned < need:
                victims = []
            records, freed = s.ledger.evict(txn, victims)
        if records:
            with s.env.begin(db=s.meta_db, write=True) as txn:
                self.evicted_records += records
                txn.put(EVICTED, COUNT.pack(self.evicted_records))
            log.info("evicted %d groups (%d records, %d bytes)", len(victims), records, freed)
            if self.on_evict is not None:
                self.on_evict(records)
        return records, freed

    # ---- read-side accesses -------------------------------------------------------------
    def touch(self, tenant: bytes, keys: Iterable[bytes]) -> None:
        if not self.tracking:
            return
        now = self.storage.clock()
        with self._touch_lock:
            for key in keys:
                self._touched[group_id(tenant, key)] = now

    def take_touched(self) -> dict[bytes, int]:
        with self._touch_lock:
            touched, self._touched = self._touched, {}
        return touched

    def flush(self) -> None:
        """Write remembered read accesses into the ledger (one small write transaction)."""
        s = self.storage
        with s.write_lock:
            touched = self.take_touched()
            if touched:
                with s.env.begin(write=True) as txn:
                    s.ledger.touch(txn, touched)

    def _flush_loop(self) -> None:
        while not self._stop.wait(FLUSH_SECONDS):
            try:
                self.flush()
            except lmdb.Error as exc:  # e.g. a full map: must not end the flusher
                log.warning("could not record read accesses: %s", exc)

    def stop(self) -> None:
        self._stop.set()
        if self._flusher is not None:
            self._flusher.join()
            try:
                self.flush()
            except lmdb.Error as exc:
                log.warning("could not record read accesses at close: %s", exc)
