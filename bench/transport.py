"""Scenario `transport` (issue 3): gRPC record throughput through a real kvstore node on loopback
against a raw TCP socket moving the same records (same Python, same sizes, both servers in their
own process). Throughput in Gbit/s (1e9 bits/s); each figure is the median of `repeats` runs.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import asdict, dataclass

from tqdm import tqdm

from . import sockserve
from .report import Report, Table
from .servers import kvstore_node, socket_server
from .workload import payload

TARGET_RATIO = 0.7


@dataclass(frozen=True)
class TransportParams:
    records: int = 64
    record_mib: float = 4.0
    repeats: int = 3


def _gbps(nbytes: int, seconds: float) -> float:
    return nbytes * 8 / seconds / 1e9


def _grpc_samples(p: TransportParams, data: bytes, bar: tqdm) -> dict[str, list[float]]:
    from kvclient import Client

    out: dict[str, list[float]] = {"grpc_put": [], "grpc_get": [], "colocated_get": []}
    total = p.records * len(data)
    runs = [[f"kvbench/transport/{rep}/{i}".encode() for i in range(p.records)] for rep in range(p.repeats)]
    with tempfile.TemporaryDirectory(prefix="kvbench-transport-") as d, \
            kvstore_node(d, map_size_gb=max(2.0, 2.5 * p.repeats * total / 2**30)) as node:
        addr = f"127.0.0.1:{node.port}"
        with Client([addr], replication=1, timeout=60, colocated=False) as client:
            for keys in runs:
                # fresh keys per repeat: a second put of the same keys would skip the write
                t0 = time.perf_counter()
                client.put_many([(k, data) for k in keys])
                out["grpc_put"].append(_gbps(total, time.perf_counter() - t0))
                t0 = time.perf_counter()
                values = client.get_many(keys)
                out["grpc_get"].append(_gbps(total, time.perf_counter() - t0))
                _check(values, len(data))
                bar.update(2)
        # the co-located fast path (the node's LMDB read in this process), for comparison
        with Client([addr], replication=1, timeout=60, colocated=True) as client:
            for keys in runs:
                t0 = time.perf_counter()
                values = client.get_many(keys)
                out["colocated_get"].append(_gbps(total, time.perf_counter() - t0))
                _check(values, len(data))
            out["colocated_reads"] = [client.reads.get("colocated", 0)]
    return out


def _check(values: list, size: int) -> None:
    if any(v is None or len(v) != size for v in values):
        raise RuntimeError("get returned a missing or short record")


def _socket_samples(p: TransportParams, data: bytes, bar: tqdm) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"socket_put": [], "socket_get": []}
    total = p.records * len(data)
    with socket_server() as srv, sockserve.connect(f"127.0.0.1:{srv.port}") as sock:
        for _ in range(p.repeats):
            out["socket_put"].append(_gbps(total, sockserve.put_records(sock, [data] * p.records)))
            out["socket_get"].append(_gbps(total, sockserve.get_records(sock, [len(data)] * p.records)))
            bar.update(2)
    return out


def _storage_samples(p: TransportParams, data: bytes) -> dict[str, list[float]]:
    """The node's storage engine in this process (LocalStore): the ceiling under any transport."""
    from kvstore.local import LocalStore

    out: dict[str, list[float]] = {"storage_put": [], "storage_get": []}
    total = p.records * len(data)
    with tempfile.TemporaryDirectory(prefix="kvbench-storage-") as d, \
            LocalStore(d, map_size_gb=max(2.0, 2.5 * p.repeats * total / 2**30)) as store:
        for rep in range(p.repeats):
            keys = [f"kvbench/storage/{rep}/{i}".encode() for i in range(p.records)]
            t0 = time.perf_counter()
            store.put_many([(k, data) for k in keys])
            out["storage_put"].append(_gbps(total, time.perf_counter() - t0))
            t0 = time.perf_counter()
            _check(store.get_many(keys), len(data))
            out["storage_get"].append(_gbps(total, time.perf_counter() - t0))
    return out


def measure(p: TransportParams, progress: bool = True) -> dict:
    data = payload(int(p.record_mib * 2**20))
    with tqdm(total=4 * p.repeats, desc="transport", disable=not progress, leave=False) as bar:
        samples = {**_grpc_samples(p, data, bar), **_socket_samples(p, data, bar), **_storage_samples(p, data)}
    med = statistics.median
    figures = {
        "units": "Gbit/s (1e9 bits/s), median of repeats",
        "grpc_put_gbps": med(samples["grpc_put"]), "grpc_get_gbps": med(samples["grpc_get"]),
        "socket_gbps": med(samples["socket_get"]), "socket_put_gbps": med(samples["socket_put"]),
        "colocated_get_gbps": med(samples["colocated_get"]),
        "storage_put_gbps": med(samples["storage_put"]), "storage_get_gbps": med(samples["storage_get"]),
    }
    figures["ratio_get"] = figures["grpc_get_gbps"] / figures["socket_gbps"]
    figures["ratio_put"] = figures["grpc_put_gbps"] / figures["socket_put_gbps"]
    figures["target_ratio"] = TARGET_RATIO
    figures["meets_target"] = figures["ratio_get"] >= TARGET_RATIO
    figures["samples"] = samples
    return figures


def report(p: TransportParams, figures: dict) -> Report:
    rows = [
        ["gRPC get (node -> client)", figures["grpc_get_gbps"], figures["socket_gbps"], figures["ratio_get"]],
        ["gRPC put (client -> node)", figures["grpc_put_gbps"], figures["socket_put_gbps"], figures["ratio_put"]],
        ["get, co-located LMDB path", figures["colocated_get_gbps"], figures["socket_gbps"],
         figures["colocated_get_gbps"] / figures["socket_gbps"]],
        ["get, storage in-process (LocalStore)", figures["storage_get_gbps"], figures["socket_gbps"],
         figures["storage_get_gbps"] / figures["socket_gbps"]],
        ["put, storage in-process (LocalStore)", figures["storage_put_gbps"], figures["socket_put_gbps"],
         figures["storage_put_gbps"] / figures["socket_put_gbps"]],
    ]
    notes = [
        f"{p.records} records of {p.record_mib:g} MiB per run, {p.repeats} runs; loopback; node runs with --no-sync.",
        "gRPC rows use Client(colocated=False); the co-located row reads the node's LMDB in-process; "
        "the storage rows are the node's LMDB engine without any transport (copy-out and checksum included).",
        "gRPC put includes the node's checksum check and LMDB commit; the socket server only reads the bytes.",
        f"Target ratio_get >= {TARGET_RATIO}: {'met' if figures['meets_target'] else 'NOT met'} "
        f"(ratio_get = {figures['ratio_get']:.2f}).",
    ]

    def plot(fig) -> None:
        ax = fig.add_subplot(1, 1, 1)
        labels = ["gRPC get", "socket get", "gRPC put", "socket put", "co-located get"]
        values = [figures["grpc_get_gbps"], figures["socket_gbps"], figures["grpc_put_gbps"],
                  figures["socket_put_gbps"], figures["colocated_get_gbps"]]
        ax.bar(labels, values, color=["C0", "C7", "C1", "C7", "C2"])
        ax.set_ylabel("Gbit/s (median)")
        ax.set_title(f"Loopback record throughput, {p.records} x {p.record_mib:g} MiB")

    return Report("transport", asdict(p), figures,
                  Table(["path", "Gbit/s", "raw socket Gbit/s (same direction)", "ratio"], rows),
                  notes, plot, "Transport: gRPC vs raw socket on loopback")


def run(p: TransportParams, progress: bool = True) -> Report:
    return report(p, measure(p, progress))
