"""The market's meter on a node: entries per request, idempotent by id, running totals, usage
and client reports (docs/market.md, "Metering, and what it trusts").

A mixin of ``kvstore.market.Market``: it uses the market's LMDB database (``E``, ``I`` and ``C``
keys, see that module), its lock, tenants, admins and listings.
"""

from __future__ import annotations

import logging
import struct
from collections import defaultdict
from dataclasses import dataclass, field

import lmdb

from kvproto import market as mk
from kvproto.errors import InvalidArgument, NotFound
from kvproto.market import block_tokens
from kvproto.pb import kvcache_pb2 as pb

log = logging.getLogger(__name__)

U64 = struct.Struct(">Q")
COUNTERS = ("tokens_loaded", "bytes_served", "records_served", "blocks_written", "prompt_tokens",
            "cached_tokens")
REPORT_KINDS = ("colocated", "prompt", "rejected")


@dataclass
class Meter:
    """The entries one request produced, committed together (``Market.commit``)."""

    tenant: str
    entries: list[pb.MeterEntry] = field(default_factory=list)
    own_records: int = 0
    own_bytes: int = 0


class Metering:
    """Counting what a node served and stored (the Market's state: db, env, _lock, totals, ...)."""

    def meter(self, prefix: bytes) -> Meter:
        return Meter(self.tenant_of(prefix))

    @staticmethod
    def served(meter: Meter, context: tuple | None, size: int) -> None:
        if context is None:
            meter.own_records += 1
            meter.own_bytes += size
            return
        listing, index, load_id = context
        record_key, _, tokens = listing.manifest.records[index]
        layer0 = record_key[-2:] == b"\x00\x00"
        meter.entries.append(pb.MeterEntry(
            id=mk.meter_id(b"load", listing.manifest.tag, load_id, record_key), tenant=meter.tenant,
            listing=listing.manifest.listing, kind="load", tokens=tokens if layer0 else 0, bytes=size, records=1,
            publisher=listing.manifest.publisher))

    def commit(self, meter: Meter) -> int:
        """Store a request's new entries (once per id on this node) and count them."""
        with self._lock:
            self._unflushed[(meter.tenant, "bytes_served")] += meter.own_bytes
            self._unflushed[(meter.tenant, "records_served")] += meter.own_records
        if not meter.entries or self.db is None:
            return 0
        return self.record(meter.entries)

    def record(self, entries: list[pb.MeterEntry]) -> int:
        now = self.clock()
        counts: dict[tuple[str, str], int] = defaultdict(int)
        new = 0
        try:
            with self._lock, self.env.begin(db=self.db, write=True) as txn:
                for entry in entries:
                    if not entry.time_ns:
                        entry.time_ns = now
                    if not txn.put(b"I" + entry.id, U64.pack(entry.time_ns), overwrite=False):
                        continue
                    txn.put(b"E" + U64.pack(entry.time_ns) + entry.id, entry.SerializeToString())
                    new += 1
                    for counter, amount in _counts(entry):
                        counts[(entry.tenant, counter)] += amount
                self._add(txn, counts)
        except lmdb.Error as exc:  # the records were served; the meter must not fail the read
            log.error("meter commit failed, %d entries not counted: %s", len(entries), exc)
            return 0
        return new

    def _add(self, txn, counts: dict[tuple[str, str], int]) -> None:
        for (tenant, counter), amount in counts.items():
            if not amount:
                continue
            self.totals[(tenant, counter)] += amount
            txn.put(b"C" + tenant.encode() + b"\x00" + counter.encode(), U64.pack(self.totals[(tenant, counter)]))
            if self.on_count is not None:
                self.on_count(tenant, counter, amount)

    def _flush_loop(self) -> None:
        while not self._stop.wait(1.0):
            self.flush()

    def flush(self) -> None:
        with self._lock:
            pending, self._unflushed = self._unflushed, defaultdict(int)
        if not any(pending.values()) or self.db is None or self.storage.damaged:
            return
        try:
            with self._lock, self.env.begin(db=self.db, write=True) as txn:
                self._add(txn, pending)
        except lmdb.Error as exc:
            log.warning("meter flush failed: %s", exc)

    # ---- writes ----------------------------------------------------------------------------
    @staticmethod
    def check_writable(key: bytes) -> None:
        if mk.split_listing_key(key) is not None:
            raise InvalidArgument("listing keys are read-only (write your own keys)")

    def before_put(self, records, prefix: bytes) -> list[pb.MeterEntry]:
        """Entries for the blocks a put stores for the first time (a block = its layer-0 record)."""
        for rec in records:
            self.check_writable(rec.key)
        firsts = [rec for rec in records if len(rec.key) == mk.RECORD_KEY_BYTES and rec.key[-2:] == b"\x00\x00"]
        if not firsts or self.db is None:
            return []
        present = self.storage.exists([rec.key for rec in firsts], prefix)
        sizes: dict[bytes, tuple[int, int]] = defaultdict(lambda: (0, 0))
        for rec in records:
            n, b = sizes[rec.key[:32]]
            sizes[rec.key[:32]] = (n + 1, b + len(rec.payload))
        tenant = self.tenant_of(prefix)
        return [pb.MeterEntry(id=mk.meter_id(b"write", prefix, rec.key), tenant=tenant, kind="write",
                              tokens=block_tokens(rec.payload), records=sizes[rec.key[:32]][0],
                              bytes=sizes[rec.key[:32]][1]) for rec, p in zip(firsts, present) if not p]

    # ---- usage and reports -----------------------------------------------------------------
    def usage(self, request: pb.UsageRequest, prefix: bytes) -> pb.UsageResponse:
        self._usable()
        caller = self.tenant_of(prefix)
        wanted = request.tenant or caller
        if wanted != caller and caller not in self.admins:
            raise NotFound(f"no usage of {wanted!r} for you")
        until = request.until_ns or (1 << 63) - 1
        limit = min(request.limit or 10_000, 100_000)
        start = b"E" + U64.pack(max(0, request.since_ns))
        if request.start_after:
            start = max(start, b"E" + request.start_after + b"\x00")
        out, last = [], b""
        with self.env.begin(db=self.db) as txn:
            cursor = txn.cursor()
            if cursor.set_range(start):
                for key, value in cursor:
                    if key[:1] != b"E" or U64.unpack(key[1:9])[0] >= until:
                        break
                    if len(out) >= limit:
                        return pb.UsageResponse(entries=out, next=last)
                    entry = pb.MeterEntry.FromString(value)
                    if wanted == "*" or entry.tenant == wanted or entry.publisher == wanted:
                        out.append(entry)
                    last = key[1:]
        return pb.UsageResponse(entries=out)

    def report(self, request: pb.ReportRequest, prefix: bytes) -> pb.ReportResponse:
        """What a client read without the node seeing it (co-located map), its prompts (hit
        ratio), and records provenance rejected (checked here: only a record that no longer
        matches its manifest is credited)."""
        self._usable()
        tenant = self.tenant_of(prefix)
        entries = []
        for entry in request.entries:
            if entry.kind not in REPORT_KINDS or len(entry.id) != 16:
                raise InvalidArgument(f"a report entry needs a 16-byte id and a kind in {', '.join(REPORT_KINDS)}")
            entry.tenant, entry.time_ns = tenant, 0
            if entry.kind == "rejected" and not self._rejection_holds(entry, tenant):
                continue
            entries.append(entry)
        return pb.ReportResponse(accepted=self.record(entries) if entries else 0)

    def _rejection_holds(self, entry: pb.MeterEntry, tenant: str) -> bool:
        listing = self.visible(mk.listing_tag(entry.listing), tenant) if mk.LISTING_ID.match(entry.listing) else None
        if listing is None or entry.records >= len(listing.manifest.records):
            return False
        key, digest, tokens = listing.manifest.records[entry.records]
        got = self.storage.read_with(key, lambda payload, _d: mk.record_digest(key, payload), listing.prefix)
        if got is None or got == digest:
            return False
        entry.publisher, entry.tokens, entry.records = listing.manifest.publisher, tokens if key[-2:] == b"\0\0" else 0, 1
        return True


def _counts(entry: pb.MeterEntry) -> list[tuple[str, int]]:
    if entry.kind in ("load", "colocated"):
        return [("tokens_loaded", entry.tokens), ("bytes_served", entry.bytes), ("records_served", entry.records)]
    if entry.kind == "write":
        return [("blocks_written", 1)]
    if entry.kind == "prompt":
        return [("prompt_tokens", entry.prompt_tokens), ("cached_tokens", entry.tokens)]
    return []
