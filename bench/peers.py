"""Scenario `peers`: the same KV blocks written and read, side by side in one run, through this
store (a remote client and a co-located one), redis-server, Mooncake Store over TCP, a directory of per-layer
safetensors files (vLLM's example connector), and a raw TCP socket as the transport ceiling.

Per peer and workload: `put_many` of one block (all its layer records), single-record `get` of
each layer record of a block, batched `get_many` of a whole block, and `stream` (a block into a
buffer the client keeps, as the prefix loader does), with 1 and 4 concurrent clients (threads).
The report (table, ratios, notes, plot) is ``bench.peers_report``. Every byte read is compared with what was written; a
peer that returns other bytes is reported as failed, not as a number. GB = 1e9 bytes.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import tempfile
import threading
import time
from dataclasses import asdict, dataclass

import numpy as np
from tqdm import tqdm

from .economics import QWEN3_4B, KVShape
from .peer_clients import PEERS, PeerError, PeerLauncher, PeerUnavailable, RecordLayout
from .report import Report
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


def run(p: PeersParams, progress: bool = True) -> Report:
    from .peers_report import notes, plot, ratios, table  # the report reads this module's tables

    results = measure(p, progress)
    rat = ratios(results, p)
    figures = {"units": "GB/s (1e9 bytes/s); latency ms per block",
               "workloads": {k: {"label": WORKLOADS[k].label, "layers": WORKLOADS[k].shape.layers,
                                 "record_bytes": WORKLOADS[k].layout.nbytes} for k in p.workloads},
               "concurrency": "threads", "peers": results, "ratios": rat}
    return Report("peers", asdict(p), figures, table(results, p), notes(results, p, rat), plot(results, p),
                  "Peers: this store vs redis, Mooncake Store, safetensors files and a raw socket")
