"""Build and run a node: gRPC server, health service, metrics endpoint, graceful shutdown."""

from __future__ import annotations

import dataclasses
import logging
import ssl
import threading
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from kvproto.limits import grpc_channel_options
from kvproto.pb import SERVICE_NAME

from .config import ServerConfig
from .dataplane import DataPlane, server_ssl_context
from .market import Market
from .market_service import market_methods, watch_market
from .metrics import NodeMetrics
from .servicer import KVCacheServicer, instrumented
from .storage import Storage

log = logging.getLogger(__name__)

GRPC_OPTIONS = [*grpc_channel_options(), ("grpc.so_reuseport", 0), ("grpc.http2.bdp_probe", 0)]


@dataclass
class Node:
    """A running node: what tests and the CLI need to inspect and stop it."""

    server: grpc.Server
    port: int
    storage: Storage
    servicer: KVCacheServicer
    health: health.HealthServicer
    metrics: NodeMetrics
    metrics_port: int | None = None
    data_plane: DataPlane | None = None  # kvstore.dataplane; None: off
    metrics_server: object | None = None  # the /metrics HTTP server

    @property
    def data_port(self) -> int | None:
        return self.data_plane.port if self.data_plane is not None else None

    def stop(self, grace: float | None = None) -> None:
        self.health.enter_graceful_shutdown()
        if self.data_plane is not None:
            self.data_plane.stop()  # its reads end before the environment closes
        self.server.stop(grace).wait()
        self.servicer.streams.stop()
        if self.servicer.market is not None:
            self.servicer.market.close()
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server.server_close()
        self.storage.close()


def _handlers(servicer: KVCacheServicer, metrics: NodeMetrics, market: Market | None = None) -> grpc.GenericRpcHandler:
    ser = lambda msg: msg.SerializeToString()  # noqa: E731
    wrap = lambda name, fn, streaming=False: instrumented(name, fn, metrics, streaming)  # noqa: E731
    methods = {
        "Put": grpc.stream_unary_rpc_method_handler(wrap("Put", servicer.put), response_serializer=ser),
        "Get": grpc.unary_stream_rpc_method_handler(wrap("Get", servicer.get, True)),  # pre-serialized
        "Lookup": grpc.unary_unary_rpc_method_handler(wrap("Lookup", servicer.lookup), response_serializer=ser),
        "Delete": grpc.unary_unary_rpc_method_handler(wrap("Delete", servicer.delete), response_serializer=ser),
        "Stat": grpc.unary_unary_rpc_method_handler(wrap("Stat", servicer.stat), response_serializer=ser),
        "Scan": grpc.unary_unary_rpc_method_handler(wrap("Scan", servicer.scan), response_serializer=ser),
        "LocalInfo": grpc.unary_unary_rpc_method_handler(
            wrap("LocalInfo", servicer.local_info), response_serializer=ser
        ),
    }
    if market is not None:
        methods.update(market_methods(servicer, market, wrap))
    return grpc.method_handlers_generic_handler(SERVICE_NAME, methods)


def _credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    if not (config.tls_cert or config.tls_key):
        return None
    if not (config.tls_cert and config.tls_key):
        raise ValueError("--tls-cert and --tls-key go together")
    try:
        server_ssl_context(config.tls_cert, config.tls_key)  # gRPC would only say "Failed to bind"
    except ssl.SSLError as exc:
        raise ValueError(f"--tls-cert {config.tls_cert} / --tls-key {config.tls_key}: not a PEM certificate "
                         f"and its private key ({exc.reason or exc}); see the README's TLS section") from exc
    with open(config.tls_key, "rb") as k, open(config.tls_cert, "rb") as c:
        return grpc.ssl_server_credentials([(k.read(), c.read())])


def build_node(config: ServerConfig) -> Node:
    """Open storage, start the server on config.listen (port 0 picks one) and return the Node."""
    auth = None
    if config.auth_tokens_file:
        from .auth import Authenticator

        auth = Authenticator.from_file(config.auth_tokens_file)
    creds = _credentials(config)  # bad auth or TLS files fail before anything is opened
    storage = Storage(
        config.data_dir,
        config.map_size_bytes,
        sync=config.sync,
        high_water=config.high_water,
        tenant_quota=config.tenant_quota_bytes,
        shared=config.colocated is True,
        holder=config.node_id or config.listen,
        scrub_seconds=config.scrub_hours * 3600 if config.scrub_hours else None,
    )
    metrics = NodeMetrics(storage)
    storage.evictor.on_evict = metrics.evictions.inc
    data_plane = None
    if config.data_port is not None:
        tls = server_ssl_context(config.tls_cert, config.tls_key) if creds else None
        data_plane = DataPlane(storage, metrics, auth, tls, max_get_bytes=config.max_get_bytes)
        try:
            data_port = data_plane.start(_host(config.listen), config.data_port)
        except OSError:
            storage.close()
            raise
        config = dataclasses.replace(config, data_port=data_port)  # Stat advertises the bound port
    market = Market(storage, auth.tenants if auth else [], config.market_admins,
                    audit_rate=config.market_audit_rate)
    if data_plane is not None:
        data_plane.market = market
    servicer = KVCacheServicer(config, storage, metrics, auth, market=market)
    metrics.watch_streams(servicer.streams)
    watch_market(metrics, market)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=config.workers), options=GRPC_OPTIONS)
    server.add_generic_rpc_handlers((_handlers(servicer, metrics, market),))
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    try:
        port = server.add_secure_port(config.listen, creds) if creds else server.add_insecure_port(config.listen)
    except RuntimeError as exc:
        if data_plane is not None:
            data_plane.stop()
        storage.close()
        raise OSError(f"cannot listen on {config.listen}: {exc}") from exc
    server.start()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)  # the process answers
    # the store itself: NOT_SERVING while its files need a rebuild (an operator signal)
    health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING if storage.damaged
                        else health_pb2.HealthCheckResponse.SERVING)
    metrics_server = metrics_port = None
    if config.metrics_port is not None:
        metrics_host = config.metrics_host if config.metrics_host is not None else _host(config.listen)
        metrics_server = metrics.serve_http(config.metrics_port, metrics_host)
        metrics_port = metrics_server.server_port
        log.info("metrics on http://%s:%d/metrics", metrics_host, metrics_port)
    log.info("kvstore node %r listening on port %d (data plane %s), data %s", config.node_id, port,
             config.data_port, storage.path)
    return Node(server, port, storage, servicer, health_servicer, metrics, metrics_port, data_plane,
                metrics_server)


def _host(listen: str) -> str:
    """The host part of HOST:PORT ([::1]:PORT too): the data plane listens next to gRPC."""
    return listen.rsplit(":", 1)[0].strip("[]") or "0.0.0.0"


def create_server(config: ServerConfig) -> tuple[grpc.Server, int]:
    """The entry point for tests: a started server and the port it bound."""
    node = build_node(config)
    node.server.node = node  # keep storage reachable for callers that want to stop cleanly
    return node.server, node.port


def serve_forever(config: ServerConfig, stop_event: threading.Event, cluster=None) -> None:
    """`cluster`: kvstore.etcd_member.EtcdSettings (membership on etcd) or None (a cluster file)."""
    from .cluster_node import start_cluster_side

    node = build_node(config)
    try:
        side = start_cluster_side(node, config, cluster)  # etcd unreachable: raises, the node stops
    except BaseException:
        node.stop(0)
        raise
    print(f"kvstore listening on {config.listen.rsplit(':', 1)[0]}:{node.port}", flush=True)
    stop_event.wait()
    log.info("shutting down (grace %.1fs)", config.grace_seconds)
    side.stop()
    node.stop(config.grace_seconds)
