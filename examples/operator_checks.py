"""An operator's round: health, a write that says where it landed, repair, statistics.

    KVCACHE_NODES=127.0.0.1:7070,127.0.0.1:7071 python examples/operator_checks.py

The same as `kvctl health`, `kvctl put`, `kvctl repair` and `kvctl stat`; exits 1 when a node
does not serve or the repair could not finish.
"""

from __future__ import annotations

import json
import os
import sys

from kvclient import Client


def main() -> int:
    nodes = os.environ.get("KVCACHE_NODES", "127.0.0.1:7070,127.0.0.1:7071")
    with Client(nodes, timeout=2.0) as kv:
        health = kv.health()
        print("health:", json.dumps(health))
        placed = kv.put(b"operator-check", b"written by examples/operator_checks.py")
        print("written on", placed.written, "missed", placed.missed)
        report = kv.repair()  # every key back on all its owners; deletes that missed a node applied
        print("repair:", json.dumps(report.as_dict()))
        stats = kv.stat()
        print("records per node:", {n: s.get("records", s.get("error")) for n, s in stats.items()})
        kv.delete([b"operator-check"])
    return 0 if report.ok and all(s == "SERVING" for s in health.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
