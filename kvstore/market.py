"""The node's side of the context market: listings, grants and the meter, in LMDB (docs/market.md).

One named database (``market``) in the node's environment holds:

- ``L ‖ tag``            -> the listing (JSON: manifest, signature, key, publisher, status, times)
- ``G ‖ tag ‖ tenant``   -> a grant
- ``E ‖ time ns ‖ id``   -> one meter entry (a serialized ``MeterEntry``)
- ``I ‖ id``             -> its time (the idempotency index: an id is counted once per node)
- ``C ‖ tenant ‖ 0 ‖ counter`` -> this node's running totals (Prometheus, restored at start)

Listing keys (``kvproto.market``) are resolved here: to the publisher's key space for a tenant
the listing lets read, to a plain miss for anyone else (absent and forbidden look the same).
Records served from a listing are metered per load id in the same request, committed before the
request returns: a node killed mid-way counted nothing of it, and the replica that serves the
retry counts it once. Reads of a tenant's own records are totals only, flushed every second.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field

from kvproto import market as mk
from kvproto.errors import FailedPrecondition, InvalidArgument, NotFound
from kvproto.pb import kvcache_pb2 as pb

from .auth import tenant_prefix
from .meter import U64, Metering

log = logging.getLogger(__name__)

MARKET_DB = b"market"
MAX_TENANT_LABELS = 64
PENDING = "pending audit"


@dataclass
class Listing:
    manifest: mk.Manifest
    signature: bytes
    public_key: bytes
    prefix: bytes  # the publisher's key space
    status: str = "ok"
    published_ns: int = 0
    withdrawn_ns: int = 0
    grants: set[str] = field(default_factory=set)
    index: dict[bytes, int] = field(default_factory=dict)
    audit_blocks: int = 0  # blocks an audit must recompute to clear PENDING
    earlier: list[tuple[int, int]] = field(default_factory=list)  # (published, withdrawn) before a republish

    def readable_by(self, tenant: str) -> bool:
        if self.status != "ok" or self.withdrawn_ns:
            return False
        return tenant == self.manifest.publisher or self.manifest.visibility == "public" or tenant in self.grants

    def stored(self) -> bytes:
        return json.dumps({"manifest": self.manifest.raw.decode(), "signature": self.signature.hex(),
                           "public_key": self.public_key.hex(), "prefix": self.prefix.hex(),
                           "status": self.status, "published_ns": self.published_ns,
                           "withdrawn_ns": self.withdrawn_ns, "audit_blocks": self.audit_blocks,
                           "earlier": self.earlier}).encode()

    def info(self, tenant: str) -> pb.ListingInfo:
        grants = sorted(self.grants) if tenant == self.manifest.publisher else []
        return pb.ListingInfo(manifest=self.manifest.raw, signature=self.signature, public_key=self.public_key,
                              status=self.status, grants=grants, published_ns=self.published_ns,
                              withdrawn_ns=self.withdrawn_ns, audit_blocks=self.audit_blocks,
                              earlier_periods=[t for period in self.earlier for t in period])


class Market(Metering):
    def __init__(self, storage, tenants: list[str], admins: tuple[str, ...] = (), clock=time.time_ns,
                 audit_rate: float = 0.0) -> None:
        self.storage = storage
        self.clock = clock
        self.admins = set(admins)
        self.audit_rate = audit_rate  # the provider's policy: share of blocks an admin audit recomputes
        self.tenants = {tenant_prefix(t): t for t in tenants} if tenants else {b"": ""}
        self._lock = threading.Lock()
        self.listings: dict[bytes, Listing] = {}
        self.totals: dict[tuple[str, str], int] = defaultdict(int)  # durable (C keys)
        self._unflushed: dict[tuple[str, str], int] = defaultdict(int)
        self.env = storage.env
        self.db = None
        if self.env is not None and not storage.readonly:
            self.db = self.env.open_db(MARKET_DB)
            self._load()
        self.on_count = None  # (tenant, counter, amount) -> None: the Prometheus counters
        self._stop = threading.Event()
        self._flusher = threading.Thread(target=self._flush_loop, name="market-meter", daemon=True)
        self._flusher.start()

    # ---- state -------------------------------------------------------------------------
    def _load(self) -> None:
        with self.env.begin(db=self.db) as txn:
            for key, value in txn.cursor():
                kind = key[:1]
                if kind == b"L":
                    self.listings[key[1:]] = self._listing_of(json.loads(value))
                elif kind == b"G":
                    tag, tenant = key[1 : 1 + mk.TAG_BYTES], key[1 + mk.TAG_BYTES :].decode()
                    if tag in self.listings:
                        self.listings[tag].grants.add(tenant)
                elif kind == b"C":
                    tenant, counter = key[1:].split(b"\x00", 1)
                    self.totals[(tenant.decode(), counter.decode())] = U64.unpack(value)[0]

    @staticmethod
    def _listing_of(doc: dict) -> Listing:
        manifest = mk.parse_manifest(doc["manifest"].encode())
        return Listing(manifest, bytes.fromhex(doc["signature"]), bytes.fromhex(doc["public_key"]),
                       bytes.fromhex(doc["prefix"]), doc["status"], doc["published_ns"], doc["withdrawn_ns"],
                       index=manifest.index_of(), audit_blocks=doc.get("audit_blocks", 0),
                       earlier=[tuple(p) for p in doc.get("earlier", [])])

    def _usable(self) -> None:
        if self.db is None or self.storage.damaged:
            raise FailedPrecondition("this node's files need a rebuild: the market is unavailable")

    def tenant_of(self, prefix: bytes) -> str:
        return self.tenants.get(prefix, prefix.hex())

    def visible(self, tag: bytes, tenant: str) -> Listing | None:
        listing = self.listings.get(tag)
        if listing is None:
            return None
        mine = listing.manifest.publisher == tenant or tenant in self.admins
        return listing if mine or listing.readable_by(tenant) else None

    # ---- publish, grant, audit -----------------------------------------------------------
    def publish(self, request: pb.PublishRequest, prefix: bytes) -> pb.PublishResponse:
        self._usable()
        tenant = self.tenant_of(prefix)
        try:
            manifest = mk.parse_manifest(request.manifest)
            mk.verify(request.manifest, request.signature, request.public_key)
        except mk.ManifestError as exc:
            raise InvalidArgument(str(exc)) from None
        if manifest.publisher != tenant:
            raise InvalidArgument(f"manifest names publisher {manifest.publisher!r}, the caller is {tenant!r}")
        old = self.listings.get(manifest.tag)
        if old is not None and old.manifest.publisher != tenant:
            raise FailedPrecondition(f"listing id {manifest.listing!r} is taken")  # no probing: a taken name
        if old is not None and old.public_key != request.public_key:
            raise FailedPrecondition(f"listing {manifest.listing!r} was published under another key")
        expect = [] if request.owns_none else (list(request.expect) or range(len(manifest.records)))
        if any(i >= len(manifest.records) for i in expect):
            raise InvalidArgument("expect names a record the manifest does not have")
        checked = self._check_records(manifest, [manifest.records[i] for i in expect], prefix)
        required = self.audit_required(manifest, request.audit_blocks)
        if old is not None and old.status.startswith("failed") and tenant not in self.admins:
            status = old.status  # a failed audit stays until an admin's audit passes: republishing clears nothing
        elif required and not (old is not None and old.status == "ok" and old.manifest.raw == manifest.raw):
            status = PENDING  # new or changed records: served to nobody until an audit of `required` passes
        else:
            status = "ok"
        listing = Listing(manifest, request.signature, request.public_key, prefix, status, self.clock(),
                          index=manifest.index_of(), audit_blocks=required)
        if old is not None:  # grants, billing periods and an unmet audit carry over
            listing.grants, listing.earlier = old.grants, list(old.earlier)
            if old.withdrawn_ns:
                listing.earlier.append((old.published_ns, old.withdrawn_ns))
            else:
                listing.published_ns = old.published_ns
            if status != "ok":
                listing.audit_blocks = max(required, old.audit_blocks)
        with self._lock, self.env.begin(db=self.db, write=True) as txn:
            txn.put(b"L" + manifest.tag, listing.stored())
            self.listings[manifest.tag] = listing
        log.info("listing %s published by %s: %d records, %d tokens", manifest.listing, tenant,
                 len(manifest.records), manifest.tokens)
        return pb.PublishResponse(listing=manifest.listing, checked=checked)

    def audit_required(self, manifest: mk.Manifest, asked: int) -> int:
        """Blocks an audit must recompute: what the publisher asked, at least the node's rate."""
        if asked > manifest.full_blocks:
            raise InvalidArgument(f"audit_blocks {asked}: the listing has {manifest.full_blocks} full blocks")
        return max(asked, manifest.audit_blocks_at(self.audit_rate))

    def _check_records(self, manifest: mk.Manifest, records, prefix: bytes) -> int:
        """Attest at publish: every expected record is stored here and hashes to its digest."""
        missing = bad = 0
        for key, digest, _ in records:
            got = self.storage.read_with(key, lambda payload, _d, key=key: mk.record_digest(key, payload), prefix)
            if got is None:
                missing += 1
            elif got != digest:
                bad += 1
        if missing or bad:
            raise FailedPrecondition(f"the publisher does not hold the listing's records here: {missing} missing, "
                                     f"{bad} differ from their manifest digest (store the blocks first)")
        return len(records)

    def _own(self, name: str, prefix: bytes) -> Listing:
        tenant = self.tenant_of(prefix)
        listing = self.listings.get(mk.listing_tag(name)) if mk.LISTING_ID.match(name or "") else None
        if listing is None or (listing.manifest.publisher != tenant and tenant not in self.admins):
            raise NotFound(f"no listing {name!r} of yours")  # others' listings look absent
        return listing

    def grant(self, request: pb.GrantRequest, prefix: bytes) -> pb.GrantResponse:
        self._usable()
        listing = self._own(request.listing, prefix)
        if request.tenant not in self.tenants.values() or not request.tenant:
            raise InvalidArgument(f"unknown tenant {request.tenant!r}")
        key = b"G" + listing.manifest.tag + request.tenant.encode()
        with self._lock, self.env.begin(db=self.db, write=True) as txn:
            if request.revoke:
                changed = txn.delete(key)
                listing.grants.discard(request.tenant)
            else:
                changed = txn.put(key, b"", overwrite=False)
                listing.grants.add(request.tenant)
        return pb.GrantResponse(changed=bool(changed))

    def audit(self, request: pb.AuditRequest, prefix: bytes) -> pb.AuditResponse:
        """Mark a listing failed (its publisher or an admin tenant, --market-admins) or passed.

        A pass must cover the listing's ``audit_blocks``. Only an admin clears a failed listing,
        and on a node with ``--market-audit-rate`` only an admin clears a pending one: there the
        provider, not the publisher, vouches for the KV. Without a rate, a publisher that asked
        for an audit at publish clears its own pending listing (it checks its own work)."""
        self._usable()
        listing = self._own(request.listing, prefix)
        admin = self.tenant_of(prefix) in self.admins
        if not request.failed:
            if listing.status.startswith("failed") and not admin:
                raise FailedPrecondition(f"listing {request.listing!r} failed an audit: only a market admin's "
                                         f"audit clears it")
            if listing.status == PENDING and self.audit_rate > 0 and not admin:
                raise FailedPrecondition(f"listing {request.listing!r} waits for a market admin's audit "
                                         f"(this node's --market-audit-rate)")
            if request.blocks < listing.audit_blocks and listing.status != "ok":
                raise FailedPrecondition(f"listing {request.listing!r} needs an audit of {listing.audit_blocks} "
                                         f"blocks, this one recomputed {request.blocks}")
        listing.status = f"failed: {request.evidence or 'audit'}"[:500] if request.failed else "ok"
        with self._lock, self.env.begin(db=self.db, write=True) as txn:
            txn.put(b"L" + listing.manifest.tag, listing.stored())
        log.warning("listing %s audit: %s", request.listing, listing.status)
        return pb.AuditResponse(status=listing.status)

    def withdraw(self, request: pb.WithdrawRequest, prefix: bytes) -> pb.WithdrawResponse:
        """Stop serving a listing (its publisher, or an admin): its keys answer misses, storage
        stops accruing; grants and meter entries stay. Publishing it again lists it anew."""
        self._usable()
        listing = self._own(request.listing, prefix)
        if not listing.withdrawn_ns:
            listing.withdrawn_ns = self.clock()
            with self._lock, self.env.begin(db=self.db, write=True) as txn:
                txn.put(b"L" + listing.manifest.tag, listing.stored())
            log.info("listing %s withdrawn", request.listing)
        return pb.WithdrawResponse(withdrawn_ns=listing.withdrawn_ns)

    def list(self, request: pb.ListingsRequest, prefix: bytes) -> pb.ListingsResponse:
        self._usable()
        tenant = self.tenant_of(prefix)
        if request.listing:
            found = self.visible(mk.listing_tag(request.listing), tenant) if mk.LISTING_ID.match(request.listing) else None
            return pb.ListingsResponse(listings=[found.info(tenant)] if found else [])
        return pb.ListingsResponse(listings=[item.info(tenant) for item in self.listings.values()
                                             if self.visible(item.manifest.tag, tenant)])

    # ---- reads: resolving listing keys, metering what is served --------------------------
    def resolve(self, keys, prefix: bytes) -> list[tuple[bytes, bytes, tuple | None] | None]:
        """Per key: (key to read, its key space, listing context or None); None: a plain miss."""
        tenant = None
        out: list = []
        for key in keys:
            parts = mk.split_listing_key(key)
            if parts is None:
                out.append((key, prefix, None))
                continue
            record_key, tag, load_id = parts
            tenant = tenant if tenant is not None else self.tenant_of(prefix)
            listing = self.listings.get(tag)
            index = listing.index.get(record_key) if listing is not None else None
            # admins audit any listing, a publisher its own (before an audit clears it, nobody else reads it)
            auditor = (listing is not None and not listing.withdrawn_ns
                       and (tenant in self.admins or tenant == listing.manifest.publisher))
            if index is None or not (listing.readable_by(tenant) or auditor):
                out.append(None)
                continue
            out.append((record_key, listing.prefix, (listing, index, load_id)))
        return out

    def sizes(self, resolved) -> int:
        by_prefix: dict[bytes, list[bytes]] = defaultdict(list)
        for r in resolved:
            if r is not None:
                by_prefix[r[1]].append(r[0])
        return sum(self.storage.sizes(keys, p) for p, keys in by_prefix.items())

    def exists(self, keys, prefix: bytes) -> list[bool]:
        resolved = self.resolve(keys, prefix)
        present = [False] * len(keys)
        by_prefix: dict[bytes, list[int]] = defaultdict(list)
        for i, r in enumerate(resolved):
            if r is not None:
                by_prefix[r[1]].append(i)
        for p, idx in by_prefix.items():
            for i, found in zip(idx, self.storage.exists([resolved[i][0] for i in idx], p)):
                present[i] = found
        return present

    def close(self) -> None:
        self._stop.set()
        self._flusher.join(5)
        self.flush()
