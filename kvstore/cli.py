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
    serve.add_argument("--node-id", default="", help="name reported by Stat (default: HOST:PORT)")
    serve.add_argument("--max-record-mb", type=float, default=256, help="largest record accepted")
    serve.add_argument("--no-sync", action="store_true", help="skip fsync on commit (faster, less durable)")
    serve.add_argument("--auth-tokens", default=None, help="file of 'TOKEN TENANT' lines; enables auth")
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
    serve.add_argument("--log-level", default="INFO")
    migrate = sub.add_parser("migrate", help="convert a stopped node's records to the current format")
    migrate.add_argument("--data", required=True, help="directory of the node's LMDB environment")
    migrate.add_argument("--auth-tokens", default=None, help="the node's tokens file, if it ran with auth")
    migrate.add_argument("--log-level", default="INFO")
    return parser


def check_listen(listen: str) -> str:
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--listen must be HOST:PORT with a port in 0..65535, got {listen!r}")
    return listen


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    check_listen(args.listen)
    if not 0 < args.high_water <= 1:
        raise ValueError(f"--high-water must be in (0, 1], got {args.high_water}")
    if not 0 <= args.data_port <= 65535:
        raise ValueError(f"--data-port must be in 0..65535, got {args.data_port}")
    if args.tenant_quota_gb is not None and args.tenant_quota_gb <= 0:
        raise ValueError(f"--tenant-quota-gb must be positive, got {args.tenant_quota_gb}")
    return ServerConfig(
        listen=args.listen,
        data_dir=args.data,
        map_size_gb=args.map_size_gb,
        metrics_port=args.metrics_port,
        node_id=args.node_id or args.listen,
        max_record_bytes=int(args.max_record_mb * (1 << 20)),
        sync=not args.no_sync,
        auth_tokens_file=args.auth_tokens,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        high_water=args.high_water,
        colocated={"auto": None, "on": True, "off": False}[args.colocated],
        data_port=None if args.no_data_plane else args.data_port,
        tenant_quota_bytes=int(args.tenant_quota_gb * (1 << 30)) if args.tenant_quota_gb is not None else None,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    if args.command == "migrate":
        return _migrate(args)
    try:
        config = config_from_args(args)
        os.environ.setdefault("GRPC_VERBOSITY", "NONE")  # our own one-line errors instead of C-core logs
        from .server import serve_forever

        serve_forever(config, stop)
    except (OSError, ValueError) as exc:
        print(f"kvstore: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # lmdb errors and the like: one readable line
        print(f"kvstore: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
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
