"""Prometheus metrics of one node, in a registry of its own (several nodes may share a process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from .storage import Storage


class NodeMetrics:
    def __init__(self, storage: Storage) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("kvstore_requests", "RPCs answered", ["method", "code"], registry=r)
        self.bytes_in = Counter("kvstore_bytes_in", "Payload bytes received", registry=r)
        self.bytes_out = Counter("kvstore_bytes_out", "Payload bytes sent", registry=r)
        self.hits = Counter("kvstore_hits", "Records found", registry=r)
        self.misses = Counter("kvstore_misses", "Records not served", ["reason"], registry=r)
        self.latency = Histogram(
            "kvstore_request_seconds",
            "RPC latency",
            ["method"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.evictions = Counter("kvstore_evicted_records", "Records evicted", registry=r)
        used = Gauge("kvstore_lmdb_used_bytes", "LMDB pages in use", registry=r)
        size = Gauge("kvstore_lmdb_map_size_bytes", "LMDB map size", registry=r)
        records = Gauge("kvstore_records", "Records stored", registry=r)
        used.set_function(lambda: storage.stats().used_bytes)
        size.set_function(lambda: storage.stats().map_size_bytes)
        records.set_function(lambda: storage.stats().records)

        rebuild = Gauge("kvstore_needs_rebuild", "1 while the node's files need a rebuild from the replicas",
                        registry=r)
        rebuild.set_function(lambda: 1 if storage.damaged else 0)

    def watch_streams(self, streams) -> None:
        """Gauges of the stream guard (kvstore.streams)."""
        r = self.registry
        Gauge("kvstore_open_streams", "Bulk streams being served", registry=r).set_function(streams.open_streams)
        Gauge("kvstore_streams_timed_out", "Streams ended for idling", registry=r).set_function(
            lambda: streams.timed_out)
        refused = Gauge("kvstore_streams_refused", "Streams refused over a cap", ["cap"], registry=r)
        for cap in ("tenant", "peer", "total"):
            refused.labels(cap).set_function(lambda cap=cap: streams.refused[cap])

    def serve_http(self, port: int, addr: str):
        """The /metrics HTTP server (its `server_port` is the bound port)."""
        server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        return server
