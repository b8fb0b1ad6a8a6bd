"""Node configuration: one frozen dataclass, built once from CLI flags and passed down."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from kvproto.limits import MiB

GiB = 1 << 30


@dataclass(frozen=True)
class ServerConfig:
    listen: str = "127.0.0.1:0"
    data_dir: str = "./kvstore-data"
    map_size_gb: float = 8.0
    metrics_port: int | None = None
    node_id: str = ""
    max_record_bytes: int = 256 * MiB
    max_stream_bytes: int = 1 * GiB
    sync: bool = True
    workers: int = 64
    grace_seconds: float = 5.0
    auth_tokens_file: str | None = None
    # the cluster's credential for node-to-node calls (kvstore.auth); never printed with the config
    peer_token: str | None = field(default=None, repr=False)
    tls_cert: str | None = None
    tls_key: str | None = None
    # Evict least-recently-used blocks when live pages pass this fraction of the map. 1.0 turns
    # eviction off (a full store refuses writes); `kvstore serve` defaults to 0.9.
    high_water: float = 0.9  # fraction of the map; 1.0 turns eviction off
    colocated: bool | None = None  # serve LocalInfo (the same-host fast path); default: only without auth
    tenant_quota_bytes: int | None = None  # per tenant: key + record bytes; its own LRU blocks go first
    # The data plane (kvstore.dataplane): record bytes for reads over a plain TCP socket on the
    # host of `listen`. 0 picks a free port, None turns it off (reads stay on gRPC).
    data_port: int | None = 0
    # Streams (kvstore.streams): bulk streams are capped so the small calls always find a thread
    # of the pool, and a stream idle this long is ended.
    max_get_bytes: int = 4 * GiB  # payload one Get (gRPC or data plane) may send
    stream_idle_seconds: float = 30.0
    streams_per_tenant: int = 8
    streams_per_peer: int = 32
    unary_reserve: int = 16  # threads of the pool no bulk stream may take
    metrics_host: str | None = None  # where /metrics binds; None: the host of `listen`
    scrub_hours: float | None = 24.0  # a full scrub (digests too) this often; None: at start only
    market_admins: tuple[str, ...] = ()  # tenants that may mark listings failed and read all usage
    market_audit_rate: float = 0.0  # share of a listing's blocks an admin audit passes before it is served

    def stream_guard(self):
        from .streams import StreamGuard

        return StreamGuard(max(1, self.workers - self.unary_reserve), self.streams_per_tenant,
                           self.streams_per_peer, self.stream_idle_seconds)

    @property
    def map_size_bytes(self) -> int:
        return int(self.map_size_gb * GiB)

    @property
    def data_path(self) -> str:
        return os.path.abspath(self.data_dir)
