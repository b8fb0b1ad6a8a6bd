"""Worker process of the topology scenario, run where the client (or the loader) stands, often as
`ip netns exec NS python -m bench.fetch ...`. Prints one JSON object on stdout.

  load  --addr A --tokens N          put the document's records into the node at A
  fetch --addr A --tokens N [--colocated] [--probe-addr S --bytes B]
                                     time fetching them back (warm connection), and probe S first
  probe --addr S --bytes B           raw socket throughput from a bench.sockserve server at S
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence

from . import sockserve
from .workload import Document, payload

BATCH_BYTES = 64 << 20  # one put stream per ~64 MiB


def _client(addr: str, colocated: bool):
    from kvclient import Client

    return Client([addr], replication=1, timeout=60, stream_timeout=600, colocated=colocated)


def _wait_ready(addr: str, deadline_s: float = 30.0) -> None:
    sockserve.connect(addr, deadline_s=deadline_s).close()


def load(addr: str, doc: Document) -> dict:
    _wait_ready(addr)
    records = doc.records()
    data = payload(max(size for _, size in records))
    t0 = time.perf_counter()
    with _client(addr, colocated=False) as client:
        batch, size = [], 0
        for key, n in records:
            batch.append((key, memoryview(data)[:n]))
            size += n
            if size >= BATCH_BYTES:
                client.put_many(batch)
                batch, size = [], 0
        if batch:
            client.put_many(batch)
    return {"records": len(records), "bytes": doc.nbytes, "seconds": time.perf_counter() - t0}


def fetch(addr: str, doc: Document, colocated: bool, min_seconds: float = 1.0, max_repeats: int = 3) -> dict:
    _wait_ready(addr)
    keys = [key for key, _ in doc.records()]
    times = []
    with _client(addr, colocated) as client:
        client.get_many(keys[:1])  # connect (and attach the co-located reader) before timing
        while len(times) < max_repeats and sum(times) < min_seconds:
            t0 = time.perf_counter()
            values = client.get_many(keys)
            times.append(time.perf_counter() - t0)
            got = sum(len(v) for v in values if v is not None)
            if got != doc.nbytes:
                raise RuntimeError(f"fetched {got} of {doc.nbytes} bytes")
        reads = dict(getattr(client, "reads", {}))
    return {"bytes": doc.nbytes, "seconds": statistics.median(times), "samples": times, "reads": reads}


def probe(addr: str, nbytes: int) -> dict:
    with sockserve.connect(addr) as sock:
        sockserve.get_records(sock, [1 << 20] * 4)  # open the TCP window first
        chunk = 1 << 20
        sizes = [chunk] * max(1, nbytes // chunk)
        seconds = sockserve.get_records(sock, sizes)
    total = sum(sizes)
    return {"bytes": total, "seconds": seconds, "bps": total * 8 / seconds}


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=["load", "fetch", "probe"])
    ap.add_argument("--addr", required=True)
    ap.add_argument("--tokens", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--colocated", action="store_true")
    ap.add_argument("--bytes", type=int, default=64 << 20)
    ap.add_argument("--probe-addr", default=None, help="fetch: also probe this socket server")
    args = ap.parse_args(argv)
    doc = Document(args.tokens, seed=args.seed)
    if args.mode == "load":
        out = load(args.addr, doc)
    elif args.mode == "fetch":
        probed = probe(args.probe_addr, args.bytes) if args.probe_addr else None
        out = {**fetch(args.addr, doc, args.colocated), "probe": probed}
    else:
        out = probe(args.addr, args.bytes)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
