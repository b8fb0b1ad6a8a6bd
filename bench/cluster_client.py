"""One host's client of `kvbench cluster` (run inside that host's namespace): Zipf reads of whole
documents for a while, one JSON line per request (time, records from the local map, remote, ms)."""

from __future__ import annotations

import argparse
import json
import random
import sys
import time

from kvclient import Client

LAYERS = 36


def doc_keys(doc: int, blocks: int) -> list[bytes]:
    import hashlib

    out = []
    for b in range(blocks):
        block = hashlib.sha256(f"kvbench-cluster/doc{doc}/block{b}".encode()).digest()
        out += [block + layer.to_bytes(2, "big") for layer in range(LAYERS)]
    return out


def zipf_weights(n: int, s: float) -> list[float]:
    return [1.0 / (r ** s) for r in range(1, n + 1)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--etcd", required=True)
    ap.add_argument("--cluster", default="bench")
    ap.add_argument("--docs", type=int, default=50)
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--record-kib", type=int, default=64)
    ap.add_argument("--zipf", type=float, default=1.0)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--edge", type=int, default=1)
    ap.add_argument("--populate", action="store_true")
    args = ap.parse_args(argv)
    with Client(etcd=args.etcd, cluster=args.cluster, timeout=10, edge=bool(args.edge) and not args.populate) as kv:
        if args.populate:
            rng = random.Random(1)
            for doc in range(args.docs):
                keys = doc_keys(doc, args.blocks)
                kv.put_many([(k, rng.randbytes(args.record_kib << 10)) for k in keys])
            print(json.dumps({"populated": args.docs}), flush=True)
            return 0
        rng = random.Random(args.seed)
        weights = zipf_weights(args.docs, args.zipf)
        start = time.monotonic()
        while time.monotonic() - start < args.seconds:
            doc = rng.choices(range(args.docs), weights)[0]
            keys = doc_keys(doc, args.blocks)
            before = dict(kv.reads)
            t0 = time.perf_counter()
            values = kv.get_many(keys)
            ms = (time.perf_counter() - t0) * 1e3
            print(json.dumps({"t": round(time.monotonic() - start, 3), "doc": doc, "ms": round(ms, 2),
                              "local": kv.reads["colocated"] - before["colocated"],
                              "remote": kv.reads["remote"] - before["remote"],
                              "missing": sum(v is None for v in values)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
