"""The report of `kvbench peers`: the table, the ratios named by peer and op, the notes and the
plot, from the results of ``bench.peers.measure``."""

from __future__ import annotations

import os

from .peers import OPS, WORKLOADS, PeersParams
from .report import Table


def _op(entry: dict, op: str, n: int) -> dict | None:
    return next((r for r in entry["ops"] if r["op"] == op and r["clients"] == n), None)


def _gbps(results, wname, peer, op, n) -> float | None:
    e = next((e for e in results if e["workload"] == wname and e["peer"] == peer), None)
    r = _op(e, op, n) if e else None
    return r["gbps"] if r else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


RATIOS = (  # (peer, op) over (peer, op), per workload and client count
    ("kvstore-grpc", "get", "redis", "get"), ("kvstore-grpc", "get_many", "redis", "get_many"),
    ("kvstore-remote", "get", "redis", "get"), ("kvstore-remote", "get_many", "redis", "get_many"),
    ("kvstore-grpc", "get_many", "raw-socket", "get_many"), ("kvstore-remote", "get_many", "raw-socket", "get_many"),
    ("kvstore-remote", "stream", "raw-socket", "stream"), ("kvstore-grpc", "stream", "raw-socket", "stream"),
    ("kvstore-remote", "stream", "redis", "stream"),
    ("kvstore-colocated", "get_many", "kvstore-grpc", "get_many"), ("kvstore-colocated", "get_many", "redis", "get_many"),
)


def ratios(results: list[dict], p: PeersParams) -> dict:
    return {w: {f"{n}_clients": {f"{a} {op_a} / {b} {op_b}": _ratio(_gbps(results, w, a, op_a, n),
                                                                     _gbps(results, w, b, op_b, n))
                                 for a, op_a, b, op_b in RATIOS} for n in p.clients} for w in p.workloads}


def _fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}g}"


def table(results: list[dict], p: PeersParams) -> Table:
    rows = []
    for e in results:
        if e["status"] != "measured":
            rows.append([e["workload"], e["peer"], *["-"] * 8, f"{e['status']}: {e['reason']}"])
            continue
        for n in p.clients:
            put, get, many, stream = (_op(e, op, n) for op in OPS)
            lat = lambda r: f"{r['p50_ms']:.1f} / {r['p99_ms']:.1f}"  # noqa: E731
            status = "measured" + ("" if e["verified"] else " (bytes not checkable)")
            rows.append([e["workload"], e["peer"], n, put["gbps"], get["gbps"], lat(get), many["gbps"], lat(many),
                         stream["gbps"], lat(stream), status])
    return Table(["workload", "peer", "clients", "put_many GB/s", "get GB/s", "get p50 / p99 ms per block",
                  "get_many GB/s", "get_many p50 / p99 ms per block", "stream GB/s",
                  "stream p50 / p99 ms per block", "status"], rows)


def _read_path(results: list[dict], peer: str) -> str:
    paths = {e["read_path"] for e in results if e["peer"] == peer and "read_path" in e}
    return " / ".join(sorted(paths)) or "n/a"


def notes(results: list[dict], p: PeersParams, rat: dict) -> list[str]:
    notes = [
        f"Machine: {p.machine_note or f'{os.cpu_count()} cores'}; absolute figures move with its load, "
        "the ratios come from the same run. Everything on 127.0.0.1.",
        f"{p.blocks} blocks of 256 tokens per workload, all peers up at once, passes interleaved round robin "
        f"across peers; writes once per client count (fresh keys), reads {p.repeats} passes over the 1-client "
        "blocks; GB/s = median over passes; latency = one block (all its layer records: one call for "
        "get_many, one call per record for get), pooled over passes.",
        "Concurrency: threads, one client object each, except kvstore-colocated (one kvclient.Client shared: "
        "a process opens the node's LMDB once) and Mooncake (one store per process shared, a registered "
        "buffer per thread); the GIL and the cores bound every Python client.",
        f"kvstore-remote: kvclient.Client(colocated=False), replication 1, node with --no-sync: writes over gRPC, "
        f"reads over {_read_path(results, 'kvstore-remote')}; kvstore-grpc: the same client against a node "
        f"started with --no-data-plane (reads over {_read_path(results, 'kvstore-grpc')}; get_many = one "
        "streamed Get); kvstore-colocated: kvstore-remote's node, Client(colocated=True): reads from the "
        "node's LMDB map, writes over gRPC. "
        "redis: redis-server on loopback, --save '' --appendonly no, redis-py with hiredis, pipelines for "
        "batches. mooncake: mooncake_master with its HTTP metadata server, a separate process owning the "
        "memory segment, TCP transport; get = store.get, get_many = batch_get_into a registered buffer + "
        "one copy out, put = put_batch. safetensors-dir: one file per layer record under a folder per block "
        "(vLLM's example connector), safetensors.numpy save_file/load_file, warm page cache, no fsync.",
        "stream: one block into a destination buffer each client keeps (what the prefix loader does with its "
        "KV buffers): this store's read_into (each record copied into its slot as it arrives, received into "
        "a reused buffer), Mooncake's batch_get_into its registered buffer, the raw socket's recv_into the "
        "slots; redis and safetensors-dir: get_many, then a copy into the slots.",
        "Every byte read was compared with what was written; raw-socket (bench/sockserve.py) moves the same "
        "sizes, one request per record, but its server sends zeros: a transport ceiling, not a store.",
    ]
    notes += [f"Workload {k}: {WORKLOADS[k].label}." for k in p.workloads]
    for wname, per in rat.items():
        for key, r in per.items():
            notes.append(f"Ratios, {wname}, {key.split('_')[0]} client(s): "
                         + "; ".join(f"{name} {_fmt(v)}" for name, v in r.items()) + ".")
    for e in results:
        if e["status"] != "measured":
            notes.append(f"{e['workload']}: {e['peer']} {e['status']}: {e['reason']}")
        fallback = sum(r.get("reads", {}).get("remote", 0) for r in e["ops"]) if e["peer"] == "kvstore-colocated" else 0
        if fallback:
            notes.append(f"{e['workload']}: {fallback} reads of kvstore-colocated went over the network, not the LMDB map.")
    notes.append("kvclient's read counters in the JSON (`reads`): 'colocated' from the LMDB map, 'remote' "
                 "over the network (data plane or gRPC).")
    return notes


def plot(results: list[dict], p: PeersParams):
    bars = [("stream", 1), ("get_many", 1), ("get_many", max(p.clients)), ("get", 1), ("put_many", 1)]

    def draw(fig) -> None:
        for j, wname in enumerate(p.workloads):
            ax = fig.add_subplot(1, len(p.workloads), j + 1)
            width = 0.8 / len(bars)
            for k, (op, n) in enumerate(bars):
                values = [_gbps(results, wname, peer, op, n) or 0.0 for peer in p.peers]
                ax.bar([i + k * width for i in range(len(p.peers))], values, width, label=f"{op}, {n} client(s)")
            ax.set_xticks([i + 0.4 - width / 2 for i in range(len(p.peers))], p.peers, rotation=35, ha="right",
                          fontsize=7)
            ax.set_ylabel("GB/s")
            ax.set_title(f"{wname} blocks", fontsize=9)
            if j == 0:
                ax.legend(fontsize=6)

    return draw
