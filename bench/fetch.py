"""Worker process of the topology scenario, run where the client (or the loader) stands, often as
`ip netns exec NS python -m bench.fetch ...`. Prints one JSON object on stdout.

  load  --addr A --tokens N          put the document's records into the node at A
  fetch --addr A --tokens N [--colocated] [--probe-addr S --bytes B]
                                     time fetching them back (warm connection), and probe S first
  probe --addr S --bytes B           raw socket throughput from a bench.sockserve server at S
  stripe --addrs A,B,C --tokens N    store on every node, then time primaries vs striped fetches
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

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
        _put_all(client, records, data)
    return {"records": len(records), "bytes": doc.nbytes, "seconds": time.perf_counter() - t0}


def _put_all(client, records: list[tuple[bytes, int]], data: bytes) -> None:
    batch, size = [], 0
    for key, n in records:
        batch.append((key, memoryview(data)[:n]))
        size += n
        if size >= BATCH_BYTES:
            client.put_many(batch)
            batch, size = [], 0
    if batch:
        client.put_many(batch)


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


def stripe(addrs: list[str], doc: Document, repeats: int) -> dict:
    """Store the document on every node (replication = nodes), then time fetching it back from
    primaries, striped, and striped with two streams per node, interleaved round by round."""
    from kvclient import Client

    for addr in addrs:
        _wait_ready(addr)
    records = doc.records()
    keys = [key for key, _ in records]
    sizes = dict(records)
    common = dict(replication=len(addrs), timeout=60, stream_timeout=600, colocated=False)
    with Client(addrs, stripe=False, **common) as primaries, Client(addrs, stripe=True, **common) as striped, \
            ThreadPoolExecutor(max_workers=2 * len(addrs)) as pool:
        _put_all(striped, records, payload(max(sizes.values())))

        def plan(client) -> dict[str, list[bytes]]:
            per_node: dict[str, list[bytes]] = defaultdict(list)
            for i, key in enumerate(keys):
                per_node[client.replicas(key, i)[0]].append(key)
            return per_node

        def stream(job: tuple[str, list[bytes]]) -> int:
            node, part = job
            return sum(len(v) for _, v, _ in striped.conn(node).get(part, 600) if v is not None)

        spread = plan(striped)
        split = [(node, part[h::2]) for node, part in spread.items() for h in range(2)]
        modes = {
            "primaries": (lambda: sum(len(v) for v in primaries.get_many(keys) if v is not None), plan(primaries), 1),
            "striped": (lambda: sum(len(v) for v in striped.get_many(keys) if v is not None), spread, 1),
            "striped-2-streams": (lambda: sum(pool.map(stream, split)), spread, 2),
        }
        samples: dict[str, list[float]] = {mode: [] for mode in modes}
        for round_ in range(repeats + 1):  # round 0 opens the connections and the TCP windows
            for mode, (fetch_all, _, _) in modes.items():
                t0 = time.perf_counter()
                got = fetch_all()
                if round_:
                    samples[mode].append(time.perf_counter() - t0)
                if got != doc.nbytes:
                    raise RuntimeError(f"{mode}: fetched {got} of {doc.nbytes} bytes")
    out = {}
    for mode, (_, per_node, streams) in modes.items():
        busiest = max(sum(sizes[k] for k in part) for part in per_node.values())
        out[mode] = {"seconds": statistics.median(samples[mode]), "samples": samples[mode], "streams": streams,
                     "busiest_node_share": busiest / doc.nbytes}
    return {"bytes": doc.nbytes, "blocks": len(records) // doc.shape.layers, "modes": out}


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
    ap.add_argument("mode", choices=["load", "fetch", "probe", "stripe"])
    ap.add_argument("--addr", default=None)
    ap.add_argument("--addrs", default=None, help="stripe: comma-separated node addresses")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--colocated", action="store_true")
    ap.add_argument("--bytes", type=int, default=64 << 20)
    ap.add_argument("--probe-addr", default=None, help="fetch: also probe this socket server")
    args = ap.parse_args(argv)
    doc = Document(args.tokens, seed=args.seed)
    if (args.addrs if args.mode == "stripe" else args.addr) is None:
        ap.error(f"{args.mode} needs --{'addrs' if args.mode == 'stripe' else 'addr'}")
    if args.mode == "stripe":
        out = stripe(args.addrs.split(","), doc, args.repeats)
    elif args.mode == "load":
        out = load(args.addr, doc)
    elif args.mode == "fetch":
        probed = probe(args.probe_addr, args.bytes) if args.probe_addr else None
        out = {**fetch(args.addr, doc, args.colocated), "probe": probed}
    else:
        out = probe(args.addr, args.bytes)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
