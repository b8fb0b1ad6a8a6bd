"""A benchmark reader: write N records, read them back in batches, report GB/s (one unit).

    KVCACHE_NODES=127.0.0.1:7070 python examples/benchmark_reader.py --records 64 --mib 1

Reads go through the co-located map when the node runs on this host, else over the network;
the counters say which (`Client.reads`). For the full benchmarks: `kvbench --help`.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time

from kvclient import Client


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", default=os.environ.get("KVCACHE_NODES", "127.0.0.1:7070"))
    p.add_argument("--records", type=int, default=64)
    p.add_argument("--mib", type=float, default=1.0, help="record size (MiB)")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    size = int(args.mib * (1 << 20))
    keys = [hashlib.sha256(b"bench-reader-%d" % i).digest() for i in range(args.records)]
    value = os.urandom(size)
    with Client(args.nodes, timeout=30.0) as kv:
        kv.put_many([(k, value) for k in keys])
        best = float("inf")
        for _ in range(args.rounds):
            started = time.perf_counter()
            values = kv.get_many(keys)
            best = min(best, time.perf_counter() - started)
            assert all(v == value for v in values), "a record came back different"
        total = size * len(keys)
        print(f"read {total / 1e9:.3f} GB in {best:.4f} s: {total / best / 1e9:.2f} GB/s "
              f"(reads: {kv.reads['colocated']} co-located, {kv.reads['remote']} remote)")
        kv.delete(keys)
    return 0


if __name__ == "__main__":
    sys.exit(main())
