"""Loopback read throughput of the node's data plane vs gRPC Get vs redis-server vs a raw socket.

One run, one client process, every server in its own process: 64 records of 1 MiB read one by
one (`get`) and in one call (`get_many`), and a streamed batch of 36 records of 1 MiB (one block
of Qwen3-4B layers). Prints a Markdown table and writes JSON (with the environment) to --out.

    python -m bench.dataplane_probe [--repeats 7] [--out bench/results/dataplane_probe.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

from bench import sockserve
from bench.load import _timed_runs
from bench.peer_clients import free_port
from bench.servers import kvstore_node, socket_server
from kvclient import Client

MiB = 1 << 20
RECORDS, BATCH = 64, 36


def _rate(fn: Callable[[], object], nbytes: int, repeats: int) -> float:
    """Median GB/s of `repeats` timed runs after one warm-up."""
    return nbytes / _timed_runs(fn, repeats, statistics.median) / 1e9


def kvstore_rows(keys: list[bytes], values: list[bytes], repeats: int) -> dict[str, float]:
    rows: dict[str, float] = {}
    data = tempfile.mkdtemp(prefix="dp-probe-")
    try:
        with kvstore_node(data, map_size_gb=2.0) as node:
            address = f"127.0.0.1:{node.port}"
            with Client([address], replication=1, colocated=False, timeout=30) as client:
                client.put_many(list(zip(keys, values)))
                conn = client.conn(address)
                assert conn._data_pool(5) is not None, "the node has no data plane"
                batch = keys[:BATCH]
                rows["data plane get"] = _rate(lambda: [client.get(k) for k in keys], RECORDS * MiB, repeats)
                rows["data plane get_many"] = _rate(lambda: client.get_many(keys), RECORDS * MiB, repeats)
                rows["data plane streamed 36"] = _rate(lambda: list(conn.get(batch, 30)), BATCH * MiB, repeats)
                rows["data plane get_many 36"] = _rate(lambda: client.get_many(batch), BATCH * MiB, repeats)
            with Client([address], replication=1, colocated=False, timeout=30) as client:
                conn = client.conn(address)
                conn._data_retry_at = float("inf")  # this client stays on gRPC Get
                rows["gRPC get"] = _rate(lambda: [client.get(k) for k in keys], RECORDS * MiB, repeats)
                rows["gRPC get_many"] = _rate(lambda: client.get_many(keys), RECORDS * MiB, repeats)
                rows["gRPC streamed 36"] = _rate(lambda: list(conn.get(batch, 30)), BATCH * MiB, repeats)
    finally:
        shutil.rmtree(data, ignore_errors=True)
    return rows


def redis_rows(keys: list[bytes], values: list[bytes], repeats: int) -> dict[str, float]:
    binary = shutil.which("redis-server")
    try:
        import redis
    except ImportError:
        return {}
    if binary is None:
        return {}
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        r = redis.Redis(port=port)
        deadline = time.monotonic() + 15
        while True:
            try:
                r.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        r.mset(dict(zip(keys, values)))
        batch = keys[:BATCH]
        return {
            "redis get": _rate(lambda: [r.get(k) for k in keys], RECORDS * MiB, repeats),
            "redis get_many (MGET)": _rate(lambda: r.mget(keys), RECORDS * MiB, repeats),
            "redis streamed 36 (MGET)": _rate(lambda: r.mget(batch), BATCH * MiB, repeats),
        }
    finally:
        proc.terminate()
        proc.wait(10)


def _get_kept(sock: socket.socket, count: int) -> list[bytearray]:
    """sockserve.get_records, keeping every buffer (as a caller of get_many does): fresh pages."""
    kept = []
    for _ in range(count):
        sock.sendall(sockserve.HEADER.pack(b"G", MiB))
        buf = bytearray(MiB)
        sockserve._recv_exact_into(sock, memoryview(buf))
        kept.append(buf)
    return kept


def socket_rows(repeats: int) -> dict[str, float]:
    with socket_server() as server:
        sock = sockserve.connect(f"127.0.0.1:{server.port}")
        with sock:
            return {
                "raw socket 64": _rate(lambda: sockserve.get_records(sock, [MiB] * RECORDS), RECORDS * MiB, repeats),
                "raw socket 36": _rate(lambda: sockserve.get_records(sock, [MiB] * BATCH), BATCH * MiB, repeats),
                "raw socket 36 kept": _rate(lambda: _get_kept(sock, BATCH), BATCH * MiB, repeats),
            }


def environment() -> dict[str, str]:
    import grpc

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return {"python": sys.version.split()[0], "grpcio": grpc.__version__, "cpu": platform.processor() or platform.machine(),
            "cores": str(os.cpu_count()), "commit": commit, "load": " ".join(f"{x:.1f}" for x in os.getloadavg())}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    keys = [f"probe-{i:03d}".encode() for i in range(RECORDS)]
    values = [os.urandom(MiB) for _ in keys]
    rows = {**kvstore_rows(keys, values, args.repeats), **redis_rows(keys, values, args.repeats),
            **socket_rows(args.repeats)}
    ratios = {
        "data plane get / redis get": ("data plane get", "redis get"),
        "data plane get_many / redis MGET": ("data plane get_many", "redis get_many (MGET)"),
        "data plane streamed 36 / raw socket 36": ("data plane streamed 36", "raw socket 36"),
        "data plane streamed 36 / raw socket 36 kept": ("data plane streamed 36", "raw socket 36 kept"),
        "data plane get_many 36 / raw socket 36": ("data plane get_many 36", "raw socket 36"),
        "data plane get / gRPC get": ("data plane get", "gRPC get"),
    }
    print("| path | GB/s |\n|---|---|")
    for name, rate in rows.items():
        print(f"| {name} | {rate:.2f} |")
    out_ratios = {}
    for label, (a, b) in ratios.items():
        if a in rows and b in rows:
            out_ratios[label] = rows[a] / rows[b]
            print(f"| {label} | {out_ratios[label]:.2f}x |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"env": environment(), "gbps": rows, "ratios": out_ratios}, f, indent=2)


if __name__ == "__main__":
    main()
