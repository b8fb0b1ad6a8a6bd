"""Scenario `peers`: the same KV blocks written and read, side by side in one run, through this
store (a remote client and a co-located one), redis-server, Mooncake Store over TCP, a directory of per-layer
safetensors files (vLLM's example connector), and a raw TCP socket as the transport ceiling.

Per peer and workload: `put_many` of one block (all its layer records), single-record `get` of
each layer record of a block, and batched `get_many` of a whole block, with 1 and 4 concurrent
clients (threads). Every byte read is compared with what was written; a
peer that returns other bytes is reported as failed, not as a number. GB = 1e9 bytes.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import tempfile
import threading
import time
from dataclasses import asdict, dataclass

import numpy as np
from tqdm import tqdm

from .economics import QWEN3_4B, KVShape
from .peer_clients import PEERS, PeerError, PeerLauncher, PeerUnavailable, RecordLayout
from .report import Report, Table
from .workload import Document, payload

OPS = ("put_many", "get", "get_many", "stream")
READ_OPS = ("get", "get_many", "stream")


def stream_block(client, keys: list[bytes], dest: memoryview, size: int) -> list:
    """One block into a destination the caller keeps (what the prefix loader does with KV buffers).

    This store: `read_into`, each record copied into its slot as it arrives; peers with a native
    into-buffer read (`stream_into`: Mooncake's batch_get_into, the raw socket's recv_into) use
    it; the rest get_many and copy. Returns a view per record for the byte check."""
    if hasattr(client, "read_into"):
        def sink(batch) -> None:
            for i, view, _ in batch:
                dest[i * size:i * size + len(view)] = view

        found = client.read_into(keys, sink)
        return [dest[i * size:(i + 1) * size] if ok else None for i, ok in enumerate(found)]
    if hasattr(client, "stream_into"):
        return client.stream_into(keys, dest)
    values = client.get_many(keys)
    for i, v in enumerate(values):
        if v is not None:
            dest[i * size:i * size + len(v)] = v
    return [dest[i * size:(i + 1) * size] if v is not None else None for i, v in enumerate(values)]


@dataclass(frozen=True)
class Workload:
    name: str
    label: str
    shape: KVShape
    dtype: str
    block_tokens: int = 256

    @property
    def layout(self) -> RecordLayout:
        return RecordLayout(self.dtype, (2, self.shape.kv_heads, self.block_tokens, self.shape.head_dim))

    def keys(self, blocks: int, seed: int) -> list[list[bytes]]:
        """Key-spec record keys, one list of layer keys per block (a namespace per seed)."""
        recs = Document(tokens=blocks * self.block_tokens, shape=self.shape, block_size=self.block_tokens,
                        seed=seed).records()
        n = self.shape.layers
        return [[k for k, _ in recs[b * n:(b + 1) * n]] for b in range(blocks)]

    def payloads(self, blocks: int) -> list[list[bytes]]:
        """Deterministic, distinct per record (a peer answering with another key's bytes fails)."""
        size, n = self.layout.nbytes, self.shape.layers
        if self.dtype == "float32":  # SmolLM2-shaped: pseudo-random floats, as fp32 KV looks
            return [[np.random.default_rng([b, i]).standard_normal(size // 4, dtype=np.float32).tobytes()
                     for i in range(n)] for b in range(blocks)]
        return [[payload(size, seed=b * n + i) for i in range(n)] for b in range(blocks)]


WORKLOADS = {
    "smollm2": Workload("smollm2", "SmolLM2-135M-shaped synthetic fp32 KV, not a model prefill (30 layers x 3 "
                        "KV heads x head dim 64; 393,216 B per layer record)", KVShape(30, 3, 64, 4), "float32"),
    "qwen3-4b": Workload("qwen3-4b", "Qwen3-4B-shaped fp16, random bytes (36 layers x 8 KV heads x head dim 128; "
                         "1 MiB per layer record)", QWEN3_4B, "float16"),
}


@dataclass(frozen=True)
class PeersParams:
    blocks: int = 16
    repeats: int = 3
    clients: tuple[int, ...] = (1, 4)
    workloads: tuple[str, ...] = tuple(WORKLOADS)
    peers: tuple[str, ...] = PEERS
    machine_note: str = ""  # said in the notes, e.g. "2-core box shared with another engineer"


class WrongBytes(Exception):
    """A peer returned bytes other than those written: a failure, not a number."""


def _assign(blocks: int, clients: int) -> list[list[int]]:
    """Blocks per client: round robin, every client busy even when blocks < clients."""
    per = max(1, math.ceil(blocks / clients))
    return [[(c + k * clients) % blocks for k in range(per)] for c in range(clients)]


def _run(clients, op: str, keys, data, blocks_of, dests=None) -> tuple[float, list[float], list]:
    """(wall seconds, per-block latencies, (block, values) read) of one pass, clients in parallel;
    `dests`: one block-sized buffer per client, for "stream"."""
    out: list[list] = [[] for _ in clients]
    errors: list[BaseException] = []

    def work(c: int) -> None:
        client = clients[c]
        try:
            for b in blocks_of[c]:
                t0 = time.perf_counter()
                if op == "put_many":
                    client.put_many(list(zip(keys[b], data[b % len(data)])))
                    values = None
                elif op == "get":
                    values = [client.get(k) for k in keys[b]]
                elif op == "stream":
                    values = stream_block(client, keys[b], dests[c], len(data[0][0]))
                else:
                    values = client.get_many(keys[b])
                out[c].append((b, values, time.perf_counter() - t0))
        except BaseException as exc:  # re-raised below, in the caller's thread
            errors.append(exc)

    t0 = time.perf_counter()
    if len(clients) == 1:
        work(0)
    else:
        threads = [threading.Thread(target=work, args=(c,)) for c in range(len(clients))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    done = [x for per in out for x in per]
    if op == "stream":  # a client's blocks share its destination: only its last block is still there
        checked = [per[-1] for per in out if per]
        return wall, [lat for _, _, lat in done], [(b, v) for b, v, _ in checked]
    return wall, [lat for _, _, lat in done], [(b, v) for b, v, _ in done]


def _check(op: str, read: list, data: list[list[bytes]]) -> None:
    for b, values in read:
        if len(values) != len(data[b]):
            raise WrongBytes(f"{op}: block {b}: {len(values)} values for {len(data[b])} keys")
        for i, (got, want) in enumerate(zip(values, data[b])):
            if got != want:
                raise WrongBytes(f"{op}: block {b} layer {i}: got {None if got is None else len(got)} B "
                                 f"{'(different bytes)' if got is not None and len(got) == len(want) else ''}")


def _row(op: str, n: int, walls: list[float], lats: list[float], nbytes: list[int]) -> dict:
    return {"op": op, "clients": n, "gbps": statistics.median(b / w for b, w in zip(nbytes, walls)) / 1e9,
            "p50_ms": float(np.percentile(lats, 50)) * 1e3, "p99_ms": float(np.percentile(lats, 99)) * 1e3,
            "samples": len(lats), "bytes_per_pass": nbytes[0], "passes": len(walls)}


def _reads(clients) -> dict[str, int] | None:
    """kvclient's read counters summed over the distinct client objects, if it keeps them."""
    objs = {id(o): o for o in (getattr(c, "client", c) for c in clients)}.values()
    counts = [o.reads for o in objs if isinstance(getattr(o, "reads", None), dict)]
    return {k: sum(c.get(k, 0) for c in counts) for k in counts[0]} if counts else None


class PeerRun:
    """One peer's clients, keys and samples in one workload. Writes get fresh keys per client
    count; reads are of the 1-client writes. Its passes are interleaved with the other peers'
    (round robin), so a change in the machine's load falls on every peer alike."""

    def __init__(self, connect, w: Workload, data: list[list[bytes]], p: PeersParams, seed: int) -> None:
        self.w, self.data, self.p = w, data, p
        self.block_bytes = w.layout.nbytes * w.shape.layers
        self.read_keys = w.keys(p.blocks, seed + 1)
        self.write_keys = {n: self.read_keys if n == 1 else w.keys(n * math.ceil(p.blocks / n), seed + 2 + j)
                           for j, n in enumerate(p.clients)}  # every client writes its own blocks
        self.samples: dict[tuple[str, int], dict] = {}
        self.clients: list = []
        self.dests = [memoryview(bytearray(self.block_bytes)) for _ in range(max(p.clients))]  # kept warm
        try:
            self.clients = [connect() for _ in range(max(p.clients))]
            self.verifies = getattr(self.clients[0], "verifies", True)
            warm = w.keys(1, seed)
            _run(self.clients[:1], "put_many", warm, data, [[0]])
            for op in READ_OPS:  # connections, buffers and first-call costs, untimed
                self._check(op, _run(self.clients, op, warm, data, [[0]] * len(self.clients), self.dests)[2])
        except BaseException:
            self.close()
            raise

    def _check(self, op: str, read: list) -> None:
        if self.verifies:
            _check(op, read, self.data)

    def measure_pass(self, op: str, n: int) -> None:
        keys = self.write_keys[n] if op == "put_many" else self.read_keys
        blocks_of = _assign(len(keys), n)
        before = _reads(self.clients)
        wall, lats, read = _run(self.clients[:n], op, keys, self.data, blocks_of, self.dests)
        if op != "put_many":
            self._check(op, read)
        s = self.samples.setdefault((op, n), {"walls": [], "lats": [], "sizes": [], "reads": None})
        s["walls"].append(wall)
        s["lats"] += lats
        s["sizes"].append(sum(map(len, blocks_of)) * self.block_bytes)
        if before is not None and op != "put_many":  # which path the reads took (kvclient counts them)
            after, s["reads"] = _reads(self.clients), s["reads"] or dict.fromkeys(before, 0)
            s["reads"] = {k: s["reads"][k] + after[k] - before[k] for k in before}

    def rows(self) -> list[dict]:
        rows = []
        for (op, n), s in self.samples.items():
            rows.append(_row(op, n, s["walls"], s["lats"], s["sizes"]))
            if s["reads"] is not None:
                rows[-1]["reads"] = s["reads"]
        return rows

    def close(self) -> None:
        for c in self.clients:
            c.close()
        self.clients = []

    def __enter__(self) -> "PeerRun":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _measure_workload(w: Workload, p: PeersParams, bar) -> list[dict]:
    data = w.payloads(p.blocks)
    capacity = (1 + p.blocks + sum(n * math.ceil(p.blocks / n) for n in p.clients)) * w.layout.nbytes * w.shape.layers
    entries = {peer: {"workload": w.name, "peer": peer, "status": "measured", "reason": None, "ops": []}
               for peer in p.peers}
    phases = [("put_many", n) for n in p.clients] + [(op, n) for op in READ_OPS for n in p.clients]
    with tempfile.TemporaryDirectory(prefix="kvbench-peers-") as tmp, contextlib.ExitStack() as stack:
        launcher = PeerLauncher(stack, tmp, w.layout, capacity, w.shape.layers)
        live: dict[str, PeerRun] = {}
        for k, peer in enumerate(p.peers):  # every peer up at once: their passes interleave
            try:
                live[peer] = stack.enter_context(PeerRun(launcher.open(peer, stack), w, data, p, 100 * (k + 1)))
            except PeerUnavailable as exc:
                entries[peer].update(status="skipped", reason=str(exc))
            except (WrongBytes, PeerError) as exc:
                entries[peer].update(status="failed", reason=str(exc))
        for op, n in phases:
            for _ in range(1 if op == "put_many" else p.repeats):
                for peer, run in list(live.items()):
                    try:
                        run.measure_pass(op, n)
                    except (WrongBytes, PeerError) as exc:
                        entries[peer].update(status="failed", reason=str(exc))
                        del live[peer]
                    bar.update(1)
        for peer, run in live.items():
            entries[peer].update(ops=run.rows(), verified=run.verifies)
        for peer, facts in launcher.details.items():
            entries[peer].update(facts)
    return list(entries.values())


def measure(p: PeersParams, progress: bool = True) -> list[dict]:
    steps = len(p.workloads) * len(p.peers) * len(p.clients) * (1 + len(READ_OPS) * p.repeats)
    with tqdm(total=steps, desc="peers", disable=not progress, leave=False) as bar:
        return [e for wname in p.workloads for e in _measure_workload(WORKLOADS[wname], p, bar)]


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


def _table(results: list[dict], p: PeersParams) -> Table:
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


def _notes(results: list[dict], p: PeersParams, rat: dict) -> list[str]:
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


def _plot(results: list[dict], p: PeersParams):
    bars = [("stream", 1), ("get_many", 1), ("get_many", max(p.clients)), ("get", 1), ("put_many", 1)]

    def plot(fig) -> None:
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

    return plot


def run(p: PeersParams, progress: bool = True) -> Report:
    results = measure(p, progress)
    rat = ratios(results, p)
    figures = {"units": "GB/s (1e9 bytes/s); latency ms per block",
               "workloads": {k: {"label": WORKLOADS[k].label, "layers": WORKLOADS[k].shape.layers,
                                 "record_bytes": WORKLOADS[k].layout.nbytes} for k in p.workloads},
               "concurrency": "threads", "peers": results, "ratios": rat}
    return Report("peers", asdict(p), figures, _table(results, p), _notes(results, p, rat), _plot(results, p),
                  "Peers: this store vs redis, Mooncake Store, safetensors files and a raw socket")
