"""The client's side of the context market: publish, grant, list, meter, audit (docs/market.md).

``Market(client)`` talks to every node of the client's ring over the client's own connections
(token, TLS). Listings and grants go to every node (each checks the records it owns); usage is
the union of every node's meter entries by id, so a record counted by two nodes (a retry after a
failover) counts once, and a node that was down adds its entries when it is back.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

import grpc

from kvproto import market as mk
from kvproto.errors import InvalidArgument, KVCacheError, NotFound, from_rpc_error
from kvproto.keys import record_key
from kvproto.pb import SERVICE_NAME, kvcache_pb2 as pb

from .node import explain

log = logging.getLogger(__name__)

CALLS = {
    "Publish": pb.PublishResponse, "Grant": pb.GrantResponse, "Listings": pb.ListingsResponse,
    "Usage": pb.UsageResponse, "Report": pb.ReportResponse, "Audit": pb.AuditResponse,
    "Withdraw": pb.WithdrawResponse,
}


@dataclass
class ListingView:
    """A listing as a reader sees it (the manifest parsed; its signature checked by the caller)."""

    manifest: mk.Manifest
    signature: bytes
    public_key: bytes
    status: str
    grants: list[str]
    published_ns: int
    withdrawn_ns: int
    audit_blocks: int = 0  # blocks an audit must recompute to clear "pending audit"
    earlier: list[tuple[int, int]] = field(default_factory=list)  # (published, withdrawn) before a republish

    @classmethod
    def of(cls, info: pb.ListingInfo) -> "ListingView":
        return cls(mk.parse_manifest(info.manifest), info.signature, info.public_key, info.status,
                   list(info.grants), info.published_ns, info.withdrawn_ns, info.audit_blocks,
                   list(zip(info.earlier_periods[::2], info.earlier_periods[1::2])))



@dataclass
class Usage:
    """Totals of a set of meter entries (one tenant's, a listing's, or everything)."""

    tokens_loaded: int = 0
    bytes_served: int = 0
    records_served: int = 0
    colocated_tokens: int = 0
    rejected_tokens: int = 0
    blocks_written: int = 0
    tokens_written: int = 0
    bytes_written: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    token_hours_stored: float = 0.0
    listings: dict[str, int] = field(default_factory=dict)  # listing -> tokens loaded from it

    @property
    def token_hit_ratio(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    def as_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items()}
        out["token_hit_ratio"] = round(self.token_hit_ratio, 6)
        return out


class Market:
    def __init__(self, client) -> None:
        self.client = client
        self._stubs: dict[str, dict] = {}

    def _call(self, node: str, name: str, request):
        conn = self.client.conn(node)
        stubs = self._stubs.setdefault(node, {})
        if name not in stubs:
            stubs[name] = conn.channel.unary_unary(f"/{SERVICE_NAME}/{name}", lambda m: m.SerializeToString(),
                                                   CALLS[name].FromString)
        try:
            return stubs[name](request, timeout=self.client.timeout, metadata=conn.metadata)
        except grpc.RpcError as err:
            raise explain(from_rpc_error(err, node), node) from None

    def _nodes(self) -> list[str]:
        self.client.refresh()
        return list(self.client.ring.nodes)

    def _all(self, name: str, request) -> dict[str, object]:
        """The call on every node; raises the first error (a listing must be everywhere)."""
        return {node: self._call(node, name, request) for node in self._nodes()}

    # ---- publisher -----------------------------------------------------------------------
    def publish(self, manifest: bytes, private_key, audit_blocks: int = 0) -> int:
        """Publish a signed manifest to every node; each checks the records it owns. Returns
        the records checked. InvalidArgument before anything is sent if a record is absent.
        `audit_blocks` > 0: the listing is "pending audit", served to nobody until an audit that
        recomputed that many blocks passes (``mark``); a node's --market-audit-rate may ask more."""
        parsed = mk.parse_manifest(manifest)
        keys = [key for key, _, _ in parsed.records]
        missing = sum(1 for present in self.client.exists(keys) if not present)
        if missing:
            raise InvalidArgument(f"the listing names {missing} of {len(keys)} records you do not hold: store them first")
        signature, public = mk.sign(private_key, manifest)
        owned: dict[str, list[int]] = defaultdict(list)
        for i, key in enumerate(keys):
            for node in self.client.replicas(key)[: self.client.replication]:
                owned[node].append(i)
        checked = 0
        for node in self._nodes():  # a node that owns none of it still keeps it (grants, usage)
            request = pb.PublishRequest(manifest=manifest, signature=signature, public_key=public,
                                        expect=owned.get(node, []), owns_none=not owned.get(node),
                                        audit_blocks=audit_blocks)
            checked += self._call(node, "Publish", request).checked
        return checked

    def grant(self, listing: str, tenant: str, revoke: bool = False) -> bool:
        replies = self._all("Grant", pb.GrantRequest(listing=listing, tenant=tenant, revoke=revoke))
        return any(r.changed for r in replies.values())

    def revoke(self, listing: str, tenant: str) -> bool:
        return self.grant(listing, tenant, revoke=True)

    def mark(self, listing: str, failed: bool, evidence: str = "", blocks: int = 0) -> str:
        """Record an audit's outcome on every node: failed (with evidence), or passed after
        recomputing `blocks` blocks (a pass clears "pending audit" when it covers audit_blocks)."""
        replies = self._all("Audit", pb.AuditRequest(listing=listing, failed=failed, evidence=evidence, blocks=blocks))
        return next(iter(replies.values())).status

    def withdraw(self, listing: str) -> int:
        """Stop serving a listing on every node; when (ns). Its storage stops accruing then."""
        replies = self._all("Withdraw", pb.WithdrawRequest(listing=listing))
        return max(r.withdrawn_ns for r in replies.values())

    # ---- readers -------------------------------------------------------------------------
    def listings(self, listing: str = "") -> list[ListingView]:
        """Listings the caller may read (or its own), from every node that answers; a node that
        says "failed" or "withdrawn" wins over one that says "ok" (a failed audit, a withdrawal
        made while a node was down, reach the reader)."""
        found: dict[str, ListingView] = {}
        errors = []
        for node in self._nodes():
            try:
                reply = self._call(node, "Listings", pb.ListingsRequest(listing=listing))
            except KVCacheError as exc:
                errors.append(exc)
                continue
            for info in reply.listings:
                view = ListingView.of(info)
                have = found.get(view.manifest.listing)
                worse = (have is None or (have.status == "ok" and view.status != "ok")
                         or view.status.startswith("failed") or (view.withdrawn_ns and not have.withdrawn_ns))
                if worse:
                    found[view.manifest.listing] = view
        if errors and len(errors) == len(self._nodes()):
            raise errors[0]
        return sorted(found.values(), key=lambda v: v.manifest.listing)

    def entries(self, tenant: str = "", since_ns: int = 0, until_ns: int = 0) -> list[pb.MeterEntry]:
        """Every node's meter entries in the window, one per id (the union)."""
        merged: dict[bytes, pb.MeterEntry] = {}
        for node in self._nodes():
            after = b""
            while True:
                reply = self._call(node, "Usage", pb.UsageRequest(tenant=tenant, since_ns=since_ns, until_ns=until_ns,
                                                                  start_after=after))
                for entry in reply.entries:
                    merged.setdefault(entry.id, entry)
                if not reply.next:
                    break
                after = reply.next
        return sorted(merged.values(), key=lambda e: (e.time_ns, e.id))

    def report(self, entries: Iterable[pb.MeterEntry]) -> int:
        """Send what the node did not see (ids make a retry harmless); to the ring owner of
        the first entry's id, or the next node if it is down."""
        entries = list(entries)
        if not entries:
            return 0
        owners = self.client.replicas(entries[0].id)
        last: KVCacheError | None = None
        for node in owners:
            try:
                return self._call(node, "Report", pb.ReportRequest(entries=entries)).accepted
            except KVCacheError as exc:
                last = exc
        raise last or NotFound("no node to report to")

    def usage(self, tenant: str = "", since_ns: int = 0, until_ns: int = 0) -> dict[str, Usage]:
        """Per tenant (and per listing, under "listing:ID"): totals over the window."""
        until = until_ns or time.time_ns()
        entries = self.entries(tenant, since_ns, until)
        return summarize(entries, self.listings(), since_ns, until)


def summarize(entries: list[pb.MeterEntry], listings: list[ListingView], since_ns: int, until_ns: int) -> dict[str, Usage]:
    out: dict[str, Usage] = defaultdict(Usage)
    for e in entries:
        rows = [out[e.tenant]] + ([out[f"listing:{e.listing}"]] if e.listing else [])
        for u in rows:
            if e.kind in ("load", "colocated"):
                u.tokens_loaded += e.tokens
                u.bytes_served += e.bytes
                u.records_served += e.records
                if e.kind == "colocated":
                    u.colocated_tokens += e.tokens
                if e.listing:
                    u.listings[e.listing] = u.listings.get(e.listing, 0) + e.tokens
            elif e.kind == "rejected":
                u.rejected_tokens += e.tokens
            elif e.kind == "write":
                u.blocks_written += 1
                u.tokens_written += e.tokens
                u.bytes_written += e.bytes
            elif e.kind == "prompt" and u is rows[0]:
                u.prompt_tokens += e.prompt_tokens
                u.cached_tokens += e.tokens
    for view in listings:
        for published, withdrawn in [*view.earlier, (view.published_ns, view.withdrawn_ns)]:
            start = max(since_ns, published)
            end = min(until_ns, withdrawn or until_ns)
            if end > start:
                hours = view.manifest.tokens * (end - start) / 3.6e12
                out[view.manifest.publisher].token_hours_stored += hours
                out[f"listing:{view.manifest.listing}"].token_hours_stored += hours
    return dict(out)


def new_load_id() -> bytes:
    return secrets.token_bytes(mk.LOAD_ID_BYTES)


def listing_record_keys(view: ListingView) -> list[bytes]:
    return [key for key, _, _ in view.manifest.records]


__all__ = ["ListingView", "Market", "Usage", "listing_record_keys", "new_load_id", "record_key", "summarize"]
