"""`kvctl`: operator commands against a cluster. Errors are one readable line; any failure exits 1.

    kvctl --nodes 127.0.0.1:7070,127.0.0.1:7071 put doc-1 ./file.bin
    KVCACHE_NODES=cluster.json kvctl get doc-1 -o out.bin
    kvctl health --nodes cluster.json          # options go before or after the command
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter

os.environ.setdefault("GRPC_VERBOSITY", "NONE")  # before grpc loads: errors are our one line

from . import market_cli
from .client import Client
from .cluster import parse_nodes
from .healing import rebalance
from kvproto.errors import KVCacheError

NODES_ENV = "KVCACHE_NODES"
ETCD_ENV = "KVCACHE_ETCD"


def parse_key(text: str) -> bytes:
    """KEY is UTF-8 text, or hex after a `hex:` prefix (block keys are binary)."""
    if text.startswith("hex:"):
        try:
            return bytes.fromhex(text[4:])
        except ValueError as exc:
            raise ValueError(f"bad hex key {text!r}") from exc
    return text.encode()


def _common(parser: argparse.ArgumentParser, top: bool) -> None:
    """The cluster options, on the top parser and on every command (so they go either side).
    On commands their default is SUPPRESS: a value given before the command is kept."""
    keep = {} if top else {"default": argparse.SUPPRESS}
    parser.add_argument("--nodes", help=f"comma-separated HOST:PORT list, or a cluster file (default: ${NODES_ENV})",
                        **({"default": None} if top else keep))
    parser.add_argument("--replication", type=int, **({"default": 2} if top else keep))
    parser.add_argument("--timeout", type=float, help="seconds per call (default 10)",
                        **({"default": 10.0} if top else keep))
    parser.add_argument("--token", help="auth token", **({"default": None} if top else keep))
    parser.add_argument("--tls-ca", help="CA certificate (PEM) to verify nodes", **({"default": None} if top else keep))
    parser.add_argument("--etcd", help="HOST:PORT[,...] of etcd: the ring follows the nodes registered there "
                        f"(default: ${ETCD_ENV})", **({"default": None} if top else keep))
    parser.add_argument("--cluster", help="cluster name in etcd (default: default)",
                        **({"default": "default"} if top else keep))
    parser.add_argument("--host-id", help="this host's identity for the co-located check",
                        **({"default": None} if top else keep))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvctl", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(p, top=True)
    sub = p.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        parser = sub.add_parser(name, help=help)
        _common(parser, top=False)
        return parser

    put = command("put", "store FILE under KEY ('-' reads stdin)")
    put.add_argument("key")
    put.add_argument("file")
    get = command("get", "fetch KEY (exit 1 if absent)")
    get.add_argument("key")
    get.add_argument("-o", "--output", default=None, help="write here instead of stdout")
    delete = command("delete", "delete KEYs from every owner (exit 1 if none was stored)")
    delete.add_argument("keys", nargs="+", metavar="key")
    exists = command("exists", "which KEYs are stored (JSON; exit 1 unless all are)")
    exists.add_argument("keys", nargs="+", metavar="key")
    command("health", "each node's health (JSON; exit 1 unless all serve)")
    command("stat", "per-node statistics (JSON; exit 1 if a node did not answer)")
    command("repair", "anti-entropy: bring every key back to full replication, apply deletes")
    command("status", "with --etcd: members, their state, and rebalancing (keys to move, moved, rate)")
    reb = command("rebalance", "after a membership change: copy keys to their new owners")
    reb.add_argument("--previous", required=True, help="the old cluster file or node list")
    reb.add_argument("--prune", action="store_true", help="also delete copies from nodes that no longer own them")
    ring = command("ring", "ring layout: share of the key space per node, or a key's owners")
    ring.add_argument("key", nargs="?")
    market_cli.add_commands(command)
    return p


def cmd_ring(client: Client, key: str | None) -> dict:
    if key is not None:
        return {"key": key, "owners": client.ring.owners(parse_key(key), client.replication)}
    positions = client.ring._positions
    owners = client.ring._owners
    share: Counter[str] = Counter()
    span = 1 << 64
    for i, pos in enumerate(positions):
        prev = positions[i - 1] if i else positions[-1] - span
        share[owners[i]] += (pos - prev) / span
    return {
        "vnodes": client.ring.vnodes,
        "replication": client.replication,
        "share": {n: round(share[n], 4) for n in client.ring.nodes},
    }


def warn(text: str) -> None:
    print(f"kvctl: warning: {text}", file=sys.stderr)


def _missed(outcomes: dict[str, object]) -> dict[str, str]:
    return {n: str(o) for n, o in outcomes.items() if isinstance(o, KVCacheError)}


def run(args: argparse.Namespace) -> int:
    with Client(args.nodes, replication=args.replication, timeout=args.timeout, token=args.token,
                tls_ca=args.tls_ca, etcd=args.etcd, cluster=args.cluster) as client:
        command = args.command
        if command in market_cli.COMMANDS:
            return market_cli.run(client, args)
        if command == "status":
            from .etcd_membership import cluster_status

            if not args.etcd:
                raise ValueError("status needs --etcd (membership from a cluster file has no rebalancer)")
            print(json.dumps(cluster_status(client.membership), indent=2))
        elif command == "put":
            if args.file == "-":
                data = sys.stdin.buffer.read()
            else:
                with open(args.file, "rb") as f:
                    data = f.read()
            placed = client.put(parse_key(args.key), data)
            print(f"stored {len(data)} bytes on {', '.join(placed.written)}")
            for node, why in placed.missed.items():
                warn(f"not written on {node} ({why}); run `kvctl repair` once it is back")
        elif command == "get":
            value = client.get(parse_key(args.key))
            if value is None:
                print(f"kvctl: not found: {args.key}", file=sys.stderr)
                return 1
            if args.output:
                with open(args.output, "wb") as f:
                    f.write(value)
            else:
                sys.stdout.buffer.write(value)
        elif command == "delete":
            client.membership.refresh()
            removed, outcomes = client.replica_set.delete([parse_key(k) for k in args.keys])
            print(f"deleted {removed} records")
            for node, why in _missed(outcomes).items():
                warn(f"{node} missed the delete ({why}); a tombstone stays on the others: "
                     f"run `kvctl repair` once it is back")
            if not removed:
                print(f"kvctl: not found: {' '.join(args.keys)}", file=sys.stderr)
                return 1
        elif command == "exists":
            present = client.exists([parse_key(k) for k in args.keys])
            print(json.dumps(dict(zip(args.keys, present)), indent=2))
            return 0 if all(present) else 1
        elif command == "health":
            health = client.health()
            print(json.dumps(health, indent=2))
            return 0 if all(s == "SERVING" for s in health.values()) else 1
        elif command == "stat":
            stats = client.stat()
            print(json.dumps(stats, indent=2))
            bad = [n for n, s in stats.items() if "error" in s]
            if bad:
                print(f"kvctl: error: no answer from {', '.join(bad)}", file=sys.stderr)
                return 1
        elif command in ("rebalance", "repair"):
            previous = parse_nodes(args.previous)[1] if command == "rebalance" else client.ring.nodes
            report = rebalance(client, previous, prune=getattr(args, "prune", False))
            out = report.as_dict()
            out["nodes"] = len(client.ring.nodes)
            print(json.dumps(out, indent=2))
            if not report.ok:
                why = [f"{report.failed} keys failed"] if report.failed else []
                if report.unreachable:
                    why.append(f"could not scan {', '.join(report.unreachable)}")
                print(f"kvctl: error: {command} incomplete: {'; '.join(why)}", file=sys.stderr)
                return 1
        elif command == "ring":
            print(json.dumps(cmd_ring(client, args.key), indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.nodes = args.nodes or os.environ.get(NODES_ENV)
    args.etcd = args.etcd or (None if args.nodes else os.environ.get(ETCD_ENV))
    if not args.nodes and not args.etcd:
        parser.error(f"give --nodes HOST:PORT,... (or a cluster file) or --etcd HOST:PORT, or set {NODES_ENV}")
    if args.host_id:
        from kvproto.host import HOST_ID_ENV

        os.environ[HOST_ID_ENV] = args.host_id
    try:
        return run(args)
    except (KVCacheError, OSError, ValueError, TypeError) as exc:
        print(f"kvctl: error: {exc}".splitlines()[0], file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
