"""`kvstore serve ...`: run a storage node until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from .config import ServerConfig


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvstore", description="KV-cache storage node")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run a node")
    serve.add_argument("--listen", default="127.0.0.1:7070", help="HOST:PORT (port 0 picks a free one)")
    serve.add_argument("--data", required=True, help="directory of the node's LMDB environment")
    serve.add_argument("--map-size-gb", type=float, default=8.0, help="LMDB map size (default 8)")
    serve.add_argument("--metrics-port", type=int, default=None, help="Prometheus /metrics port")
    serve.add_argument("--metrics-listen", default=None,
                       help="host /metrics binds (default: the host of --listen; 0.0.0.0 for every interface)")
    serve.add_argument("--node-id", default="", help="name reported by Stat (default: HOST:PORT)")
    serve.add_argument("--max-record-mb", type=float, default=256, help="largest record accepted")
    serve.add_argument("--no-sync", action="store_true", help="skip fsync on commit (faster, less durable)")
    serve.add_argument("--auth-tokens", default=None, help="file of 'TOKEN TENANT' lines; enables auth")
    serve.add_argument("--peer-token-file", default=None,
                       help="file holding the cluster's peer token (the same on every node, not a tenant's): "
                            "node-to-node copies on auth nodes; needed with --etcd and --auth-tokens")
    serve.add_argument("--tls-cert", default=None, help="PEM certificate chain; serve TLS (with --tls-key)")
    serve.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    serve.add_argument(
        "--high-water", type=float, default=0.9, help="evict LRU blocks above this map fill (default 0.9; 1 = never)"
    )
    serve.add_argument(
        "--tenant-quota-gb", type=float, default=None, help="per-tenant byte quota (evicts the tenant's own LRU blocks)"
    )
    serve.add_argument("--colocated", choices=["auto", "on", "off"], default="auto",
                       help="let same-host clients read the LMDB files directly (auto: only without auth)")
    serve.add_argument("--data-port", type=int, default=0,
                       help="TCP port of the data plane for record reads (default 0: any free port; see Stat)")
    serve.add_argument("--no-data-plane", action="store_true", help="serve reads over gRPC only")
    serve.add_argument("--stream-idle-seconds", type=float, default=30.0,
                       help="end a Put or Get stream that makes no progress this long (default 30)")
    serve.add_argument("--streams-per-tenant", type=int, default=8,
                       help="concurrent Put/Get streams one tenant may hold (auth nodes; default 8)")
    serve.add_argument("--streams-per-peer", type=int, default=32,
                       help="concurrent Put/Get streams one client address may hold (default 32)")
    serve.add_argument("--max-get-gb", type=float, default=4.0, help="payload one Get may send (default 4)")
    serve.add_argument("--scrub-hours", type=float, default=24.0,
                       help="walk and verify the whole file this often, in a child process (0: only at start)")
    serve.add_argument("--market-admins", default="",
                       help="tenants (comma-separated) that may mark listings failed and read every tenant's usage")
    serve.add_argument("--market-audit-rate", type=float, default=0.0,
                       help="share of a listing's blocks a market admin's recompute audit must pass before "
                            "the listing is served (0: no audit asked by the node)")
    serve.add_argument("--log-level", default="INFO", type=_log_level, help="DEBUG, INFO, WARNING or ERROR")
    _cluster_flags(serve)
    rebuild = sub.add_parser("rebuild", help="set a damaged node's files aside (the node stopped), to refill "
                                             "it from the replicas")
    rebuild.add_argument("--data", required=True, help="directory of the node's LMDB environment")
    rebuild.add_argument("--log-level", default="INFO", type=_log_level)
    migrate = sub.add_parser("migrate", help="convert a stopped node's records to the current format")
    migrate.add_argument("--data", required=True, help="directory of the node's LMDB environment")
    migrate.add_argument("--auth-tokens", default=None, help="the node's tokens file, if it ran with auth")
    migrate.add_argument("--log-level", default="INFO", type=_log_level)
    return parser


def _cluster_flags(serve: argparse.ArgumentParser) -> None:
    """Membership on etcd (kvstore.etcd_member) and the host identity."""
    serve.add_argument("--etcd", default=None, help="HOST:PORT[,...] of etcd: register there, rebalance by itself")
    serve.add_argument("--cluster", default="default", help="cluster name (etcd prefix /kvcache/NAME/)")
    serve.add_argument("--etcd-ttl", type=int, default=5, help="lease seconds: a killed node leaves after this")
    serve.add_argument("--advertise", default=None, help="HOST:PORT clients dial (default: --listen's host)")
    serve.add_argument("--replication", type=int, default=2, help="the cluster's replication if it has none yet")
    serve.add_argument("--vnodes", type=int, default=128, help="the cluster's virtual nodes if it has none yet")
    serve.add_argument("--rebalance-mbps", type=float, default=200.0, help="rebalancer cap, MB/s (default 200)")
    serve.add_argument("--host-id", default=None, help="this host's identity for the co-located check "
                       "(default: hostname + boot id)")


def etcd_settings(args: argparse.Namespace):
    if args.host_id:
        from kvproto.host import HOST_ID_ENV

        os.environ[HOST_ID_ENV] = args.host_id
    if not args.etcd:
        return None
    from kvproto.etcd import cluster_prefix, parse_endpoints

    from .etcd_member import EtcdSettings

    parse_endpoints(args.etcd)
    cluster_prefix(args.cluster)
    _check_range("--etcd-ttl", args.etcd_ttl, 2, 3600)
    _check_range("--replication", args.replication, 1, 16)
    _check_range("--vnodes", args.vnodes, 1, 4096)
    _check_range("--rebalance-mbps", args.rebalance_mbps, 0, low_open=True)
    return EtcdSettings(args.etcd, args.cluster, args.etcd_ttl, args.replication, args.vnodes, args.advertise,
                        args.rebalance_mbps, args.node_id)


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _log_level(value: str) -> str:
    if value.upper() not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"{value!r} is not one of {', '.join(LOG_LEVELS)}")
    return value.upper()


def _check_range(flag: str, value: float | int | None, low: float, high: float | None = None,
                 low_open: bool = False) -> None:
    """One line naming the flag, the value and what it must be."""
    if value is None:
        return
    bad = value != value or value < low or (low_open and value == low) or (high is not None and value > high)
    if bad:
        want = f"{'above' if low_open else 'at least'} {low:g}" + (f" and at most {high:g}" if high is not None else "")
        raise ValueError(f"{flag} must be {want}, got {value:g}")


def check_listen(listen: str) -> str:
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--listen must be HOST:PORT with a port in 0..65535, got {listen!r}")
    return listen


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    check_listen(args.listen)
    if not args.data.strip():
        raise ValueError("--data is empty: name the node's data directory")
    _check_range("--high-water", args.high_water, 0, 1, low_open=True)
    _check_range("--data-port", args.data_port, 0, 65535)
    _check_range("--metrics-port", args.metrics_port, 0, 65535)
    _check_range("--tenant-quota-gb", args.tenant_quota_gb, 0, low_open=True)
    _check_range("--map-size-gb", args.map_size_gb, 0, 1 << 20, low_open=True)  # LMDB maps it: address space
    _check_range("--max-record-mb", args.max_record_mb, 0, 1024, low_open=True)
    _check_range("--stream-idle-seconds", args.stream_idle_seconds, 0, low_open=True)
    _check_range("--streams-per-tenant", args.streams_per_tenant, 1)
    _check_range("--streams-per-peer", args.streams_per_peer, 1)
    _check_range("--max-get-gb", args.max_get_gb, 0, low_open=True)
    _check_range("--scrub-hours", args.scrub_hours, 0)
    _check_range("--market-audit-rate", args.market_audit_rate, 0, 1)
    admins = tuple(t for t in (args.market_admins or "").split(",") if t)
    if args.market_audit_rate and not admins:
        raise ValueError("--market-audit-rate needs --market-admins: the tenants whose audits clear a listing")
    for flag, path in (("--auth-tokens", args.auth_tokens), ("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key)):
        if path is not None and not os.path.isfile(path):
            raise ValueError(f"{flag} {path}: no such file")
    peer_token = _peer_token(args)
    return ServerConfig(
        listen=args.listen,
        data_dir=args.data,
        map_size_gb=args.map_size_gb,
        metrics_port=args.metrics_port,
        node_id=args.node_id or args.listen,
        max_record_bytes=int(args.max_record_mb * (1 << 20)),
        sync=not args.no_sync,
        auth_tokens_file=args.auth_tokens,
        peer_token=peer_token,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        high_water=args.high_water,
        colocated={"auto": None, "on": True, "off": False}[args.colocated],
        data_port=None if args.no_data_plane else args.data_port,
        tenant_quota_bytes=int(args.tenant_quota_gb * (1 << 30)) if args.tenant_quota_gb is not None else None,
        metrics_host=args.metrics_listen,
        stream_idle_seconds=args.stream_idle_seconds,
        streams_per_tenant=args.streams_per_tenant,
        streams_per_peer=args.streams_per_peer,
        max_get_bytes=int(args.max_get_gb * (1 << 30)),
        scrub_hours=args.scrub_hours or None,
        market_admins=admins,
        market_audit_rate=args.market_audit_rate,
    )


def _peer_token(args: argparse.Namespace) -> str | None:
    """--peer-token-file checked against the tenants' tokens; required by --etcd with auth."""
    if args.peer_token_file is None:
        if args.etcd and args.auth_tokens:
            raise ValueError("--etcd with --auth-tokens needs --peer-token-file FILE (one token of 16+ characters, "
                             "the same on every node, no tenant's): the nodes copy every tenant's records")
        return None
    if not args.auth_tokens:
        raise ValueError("--peer-token-file needs --auth-tokens: without auth nodes take each other's calls as they are")
    from .auth import read_peer_token, read_tokens

    return read_peer_token(args.peer_token_file, read_tokens(args.auth_tokens))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    if args.command == "migrate":
        return _migrate(args)
    if args.command == "rebuild":
        return _rebuild(args)
    try:
        config = config_from_args(args)
        cluster = etcd_settings(args)
        os.environ.setdefault("GRPC_VERBOSITY", "NONE")  # our own one-line errors instead of C-core logs
        from .server import serve_forever

        serve_forever(config, stop, cluster)
    except (OSError, ValueError) as exc:
        print(f"kvstore: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # lmdb errors and the like: one readable line
        print(f"kvstore: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    return 0


def _rebuild(args: argparse.Namespace) -> int:
    from .datadir import DataDirError
    from .rebuild import set_aside

    try:
        moved = set_aside(args.data)
    except (OSError, DataDirError) as exc:
        print(f"kvstore rebuild: error: {exc}", file=sys.stderr)
        return 2
    print(f"kvstore rebuild: {args.data}: damaged files moved to {moved}; start the node, then copy its "
          f"records back from the replicas with `kvctl --nodes NODES repair`")
    return 0


def _migrate(args: argparse.Namespace) -> int:
    from .migrate import migrate

    try:
        prefixes = []
        if args.auth_tokens:
            from .auth import Authenticator, tenant_prefix

            prefixes = [tenant_prefix(t) for t in Authenticator.from_file(args.auth_tokens).tenants]
        if not os.path.exists(os.path.join(args.data, "data.mdb")):
            raise ValueError(f"{args.data}: no data.mdb (not a node's data directory)")
        report = migrate(args.data, prefixes)
    except (OSError, ValueError) as exc:
        print(f"kvstore migrate: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # lmdb errors (e.g. the node still running) as one line
        print(f"kvstore migrate: error: {args.data}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    print(f"kvstore migrate: {args.data}: {report.converted} records converted, {report.already} already "
          f"current, {report.dropped} damaged dropped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
