"""`kvctl`: operator commands against a cluster. Errors are one readable line and exit 1."""

from __future__ import annotations

import argparse
import json
import sys
import os
from collections import Counter

os.environ.setdefault("GRPC_VERBOSITY", "NONE")  # before grpc loads: errors are our one line

from .client import Client
from .cluster import parse_nodes
from .healing import rebalance
from kvproto.errors import KVCacheError


def parse_key(text: str) -> bytes:
    """KEY is UTF-8 text, or hex after a `hex:` prefix (block keys are binary)."""
    if text.startswith("hex:"):
        try:
            return bytes.fromhex(text[4:])
        except ValueError as exc:
            raise ValueError(f"bad hex key {text!r}") from exc
    return text.encode()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvctl", description="Operate a KV-cache store cluster")
    p.add_argument("--nodes", required=True, help="comma-separated HOST:PORT list, or a cluster file")
    p.add_argument("--replication", type=int, default=2)
    p.add_argument("--timeout", type=float, default=10.0)
    p.add_argument("--token", default=None, help="auth token")
    p.add_argument("--tls-ca", default=None, help="CA certificate (PEM) to verify nodes")
    sub = p.add_subparsers(dest="command", required=True)
    put = sub.add_parser("put", help="store FILE under KEY")
    put.add_argument("key")
    put.add_argument("file")
    get = sub.add_parser("get", help="fetch KEY")
    get.add_argument("key")
    get.add_argument("-o", "--output", default=None, help="write here instead of stdout")
    sub.add_parser("stat", help="per-node statistics (JSON)")
    reb = sub.add_parser("rebalance", help="after a membership change: copy keys to their new owners")
    reb.add_argument("--previous", required=True, help="the old cluster file or node list")
    reb.add_argument("--prune", action="store_true", help="also delete copies from nodes that no longer own them")
    ring = sub.add_parser("ring", help="ring layout: share of the key space per node, or a key's owners")
    ring.add_argument("key", nargs="?")
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


def run(args: argparse.Namespace) -> int:
    with Client(args.nodes, replication=args.replication, timeout=args.timeout, token=args.token, tls_ca=args.tls_ca) as client:
        if args.command == "put":
            with open(args.file, "rb") as f:
                data = f.read()
            client.put(parse_key(args.key), data)
            print(f"stored {len(data)} bytes on {', '.join(client.ring.owners(parse_key(args.key), client.replication))}")
        elif args.command == "get":
            value = client.get(parse_key(args.key))
            if value is None:
                print(f"kvctl: not found: {args.key}", file=sys.stderr)
                return 1
            if args.output:
                with open(args.output, "wb") as f:
                    f.write(value)
            else:
                sys.stdout.buffer.write(value)
        elif args.command == "stat":
            print(json.dumps(client.stat(), indent=2))
        elif args.command == "rebalance":
            _, previous = parse_nodes(args.previous)
            report = rebalance(client, previous, prune=args.prune).as_dict()
            report["nodes"] = len(client.ring.nodes)
            print(json.dumps(report, indent=2))
        elif args.command == "ring":
            print(json.dumps(cmd_ring(client, args.key), indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (KVCacheError, OSError, ValueError) as exc:
        print(f"kvctl: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
