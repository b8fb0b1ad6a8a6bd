"""`kvbench cluster`: the prefill CDN. Hosts in network namespaces behind one switch, each with a
node (membership on etcd) and a client reading documents by Zipf; 1 Gbit/s tbf links; a node
joins a third of the way in and leaves at two thirds. Run with and without the edge tier, and
with the edge tier on nodes whose maps hold what they own plus only a few hot documents
(`small_map_gb`, high water 0.6): popularity (LRU) decides which edge copies stay.

Measured per run: the share of record bytes served from the local map over time (and in the
second half), fetch time p50/p99 per document, bytes over the hosts' links, failed reads.
KV is Qwen3-4B-shaped (36 layers, 8 KV heads, head dim 128, fp16) with blocks scaled down to
`block_tokens` tokens (records of 4 KiB per token) so 50 documents fit a 2-core box in minutes.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

from .netns import tbf_args
from .report import REPO_ROOT, Report, Table

SUBNET = "10.214.0"
ETCD_IP = f"{SUBNET}.254"


@dataclass(frozen=True)
class ClusterParams:
    hosts: int = 4
    docs: int = 50
    blocks: int = 2
    block_tokens: int = 16  # 4 KiB per token and layer (Qwen3-4B fp16): 64 KiB records
    seconds: float = 60.0
    zipf: float = 1.0
    rate_bps: int = 1_000_000_000
    replication: int = 2
    map_size_gb: float = 2.0
    small_map_gb: float | None = 0.35  # the third run's map (None: no third run)
    small_high_water: float = 0.6


class SwitchLab:
    """Namespaces <prefix>-h<i> joined by veth pairs to a bridge in <prefix>-sw, tbf both ways."""

    def __init__(self, hosts: int, rate_bps: int) -> None:
        self.prefix = f"kvc{os.getpid() % 100000}"
        self.hosts = [f"{self.prefix}-h{i}" for i in range(hosts)]
        self.switch = f"{self.prefix}-sw"
        self.rate_bps = rate_bps
        self.devs: list[str] = []
        self._made: list[str] = []

    def ip(self, i: int) -> str:
        return f"{SUBNET}.{i + 1}"

    def _run(self, *argv: str, ns: str | None = None) -> None:
        cmd = ["ip", "netns", "exec", ns, *argv] if ns else list(argv)
        subprocess.run(cmd, check=True, capture_output=True, timeout=15)

    def __enter__(self) -> "SwitchLab":
        atexit.register(self.close)  # a run that ends without __exit__ (an error in a fixture) still cleans up
        try:
            for ns in [self.switch, *self.hosts]:
                self._run("ip", "netns", "add", ns)
                self._made.append(ns)
                self._run("ip", "link", "set", "lo", "up", ns=ns)
            self._run("ip", "link", "add", "br0", "type", "bridge", ns=self.switch)
            self._run("ip", "addr", "add", f"{ETCD_IP}/24", "dev", "br0", ns=self.switch)
            self._run("ip", "link", "set", "br0", "up", ns=self.switch)
            for i, ns in enumerate(self.hosts):
                h, s = f"{self.prefix}h{i}", f"{self.prefix}s{i}"
                self._run("ip", "link", "add", h, "netns", ns, "type", "veth", "peer", "name", s, "netns", self.switch)
                self._run("ip", "addr", "add", f"{self.ip(i)}/24", "dev", h, ns=ns)
                self._run("ip", "link", "set", h, "up", ns=ns)
                self._run("ip", "link", "set", s, "master", "br0", ns=self.switch)
                self._run("ip", "link", "set", s, "up", ns=self.switch)
                self._run("tc", "qdisc", "add", "dev", h, "root", *tbf_args(self.rate_bps), ns=ns)
                self._run("tc", "qdisc", "add", "dev", s, "root", *tbf_args(self.rate_bps), ns=self.switch)
                self.devs.append(h)
        except BaseException:
            self.close()
            raise
        return self

    def link_bytes(self) -> int:
        """Bytes the hosts sent over their links so far."""
        total = 0
        for ns, dev in zip(self.hosts, self.devs):
            out = subprocess.run(["ip", "netns", "exec", ns, "cat", f"/sys/class/net/{dev}/statistics/tx_bytes"],
                                 capture_output=True, text=True, timeout=10)
            total += int(out.stdout.strip() or 0)
        return total

    def close(self) -> None:
        while self._made:
            subprocess.run(["ip", "netns", "del", self._made.pop()], capture_output=True, timeout=15)

    def __exit__(self, *exc) -> None:
        self.close()


def _popen(lab: SwitchLab, ns: str, argv: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "GRPC_VERBOSITY": "NONE"}
    return subprocess.Popen(["ip", "netns", "exec", ns, *argv], cwd=REPO_ROOT, env=env, **kw)


def _node(lab: SwitchLab, i: int, work: str, endpoint: str, host: int | None = None, map_gb: float = 2.0,
          high_water: float = 0.9) -> subprocess.Popen:
    host = i if host is None else host
    proc = _popen(lab, lab.hosts[host], [sys.executable, "-m", "kvstore.cli", "serve", "--listen",
                  f"{lab.ip(host)}:{7070 + i}", "--data", f"{work}/node{i}", "--map-size-gb", str(map_gb),
                  "--high-water", str(high_water), "--no-sync",
                  "--etcd", endpoint, "--cluster", "bench", "--etcd-ttl", "3", "--host-id", f"bench-host-{host}",
                  "--log-level", "WARNING", "--no-data-plane"], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if "listening on" not in line:
        raise RuntimeError(f"node {i} did not start: {line!r}")
    return proc


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def run_once(p: ClusterParams, edge: bool, map_gb: float | None = None, high_water: float = 0.9) -> dict:
    map_gb = map_gb or p.map_size_gb
    work = tempfile.mkdtemp(prefix="kvbench-cluster-")
    procs: list[subprocess.Popen] = []
    try:
        with SwitchLab(p.hosts, p.rate_bps) as lab:
            endpoint = f"{ETCD_IP}:2379"
            url = f"http://{endpoint}"
            procs.append(_popen(lab, lab.switch, [shutil.which("etcd") or "/usr/bin/etcd", "--data-dir",
                                f"{work}/etcd", "--listen-client-urls", url, "--advertise-client-urls", url,
                                "--listen-peer-urls", f"http://{ETCD_IP}:2380", "--log-level", "error",
                                "--logger", "zap"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            time.sleep(1.5)
            nodes = [_node(lab, i, work, endpoint, map_gb=map_gb, high_water=high_water) for i in range(p.hosts)]
            procs += nodes
            client = [sys.executable, "-m", "bench.cluster_client", "--etcd", endpoint, "--docs", str(p.docs),
                      "--blocks", str(p.blocks), "--record-kib", str(p.block_tokens * 4), "--zipf", str(p.zipf)]
            pop = _popen(lab, lab.hosts[0], [*client, "--populate"], stdout=subprocess.PIPE, text=True)
            pop.communicate(timeout=600)
            base_bytes = lab.link_bytes()
            readers = []
            for i in range(p.hosts):
                env_host = {"KVCACHE_HOST_ID": f"bench-host-{i}"}
                readers.append(subprocess.Popen(
                    ["ip", "netns", "exec", lab.hosts[i], "env", *(f"{k}={v}" for k, v in env_host.items()),
                     *client, "--seconds", str(p.seconds), "--seed", str(i), "--edge", str(int(edge))],
                    cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "GRPC_VERBOSITY": "NONE"},
                    stdout=subprocess.PIPE, text=True))
            started = time.monotonic()
            time.sleep(p.seconds / 3)
            joiner = _node(lab, p.hosts, work, endpoint, host=p.hosts - 1, map_gb=map_gb,
                           high_water=high_water)  # a second node on the last host
            procs.append(joiner)
            events = {"join": round(time.monotonic() - started, 1)}
            time.sleep(max(0.0, 2 * p.seconds / 3 - (time.monotonic() - started)))
            _stop(joiner)
            events["leave"] = round(time.monotonic() - started, 1)
            lines = [r.communicate(timeout=p.seconds + 300)[0] for r in readers]
            link = lab.link_bytes() - base_bytes
            evicted = _evicted(lab, p.hosts)
    finally:
        for proc in reversed(procs):
            _stop(proc)
        shutil.rmtree(work, ignore_errors=True)
    requests = [dict(json.loads(line), host=i) for i, out in enumerate(lines) for line in out.splitlines()
                if line.startswith("{")]
    return {**_summary(requests, p, link, events), "evicted_records": evicted,
            "map_gb": map_gb, "high_water": high_water}


def _evicted(lab: SwitchLab, hosts: int) -> int:
    """Records the first `hosts` nodes evicted (their Stat), asked from inside each host."""
    code = ("import json, sys; from kvclient import Client\n"
            "with Client([sys.argv[1]], replication=1, edge=False) as c: print(json.dumps(c.stat()))")
    total = 0
    for i in range(hosts):
        proc = _popen(lab, lab.hosts[i], [sys.executable, "-c", code, f"{lab.ip(i)}:{7070 + i}"],
                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            out = proc.communicate(timeout=60)[0]
            total += int(next(iter(json.loads(out.strip().splitlines()[-1]).values())).get("evicted_records", 0))
        except (ValueError, IndexError, StopIteration, subprocess.TimeoutExpired):
            proc.kill()
    return total


def _summary(requests: list[dict], p: ClusterParams, link_bytes: int, events: dict) -> dict:
    def share(rows: list[dict]) -> float:
        local = sum(r["local"] for r in rows)
        return round(local / max(1, local + sum(r["remote"] for r in rows)), 3)

    ms = sorted(r["ms"] for r in requests)
    buckets = max(1, int(p.seconds // 5))
    series = [share([r for r in requests if b * 5 <= r["t"] < (b + 1) * 5]) for b in range(buckets)]
    record = p.block_tokens * 4096
    return {
        "requests": len(requests),
        "local_share": share(requests),
        "local_share_second_half": share([r for r in requests if r["t"] >= p.seconds / 2]),
        "local_share_series_5s": series,
        "fetch_ms_p50": round(statistics.median(ms), 2) if ms else None,
        "fetch_ms_p99": round(ms[min(len(ms) - 1, int(0.99 * len(ms)))], 2) if ms else None,
        "bytes_read": sum(r["local"] + r["remote"] for r in requests) * record,
        "bytes_over_links": link_bytes,
        "failed_reads": sum(r["missing"] for r in requests),
        "events_s": events,
    }


def run(p: ClusterParams) -> Report:
    runs = {"edge": run_once(p, True), "no_edge": run_once(p, False)}
    if p.small_map_gb:
        runs["edge_small_map"] = run_once(p, True, p.small_map_gb, p.small_high_water)
    rows = [[name, r["requests"], r["local_share"], r["local_share_second_half"], r["fetch_ms_p50"],
             r["fetch_ms_p99"], round(r["bytes_over_links"] / 1e6, 1), r["failed_reads"], r["evicted_records"]]
            for name, r in runs.items()]
    target = runs["edge"]["local_share_second_half"] >= 0.8
    notes = [f"Local share of record bytes in the second half: {runs['edge']['local_share_second_half']} with the "
             f"edge tier, {runs['no_edge']['local_share_second_half']} without (target >= 0.8 vs ~0.5): "
             f"{'met' if target else 'NOT met'}.",
             f"{p.hosts} hosts (network namespaces, tbf {p.rate_bps / 1e9:g} Gbit/s each way), a node and a client "
             f"each; a fifth node joins on the last host at {runs['edge']['events_s']['join']} s and leaves at "
             f"{runs['edge']['events_s']['leave']} s; replication {p.replication}; Zipf s={p.zipf} over {p.docs} "
             f"documents of {p.blocks} blocks x 36 layers, {p.block_tokens * 4} KiB records."]
    if "edge_small_map" in runs:
        small = runs["edge_small_map"]
        total_mb = p.docs * p.blocks * 36 * p.block_tokens * 4 / 1024
        notes.append(f"edge small map: each node's map {p.small_map_gb:g} GiB evicting above {p.small_high_water:g} "
                     f"(about {p.small_map_gb * 1024 * p.small_high_water:.0f} MiB, against {total_mb:.0f} MiB of "
                     f"documents, {total_mb * p.replication / p.hosts:.0f} MiB owned per node): "
                     f"{small['evicted_records']} edge records evicted, local share in the second half "
                     f"{small['local_share_second_half']}, {small['failed_reads']} failed reads: the hot documents "
                     f"stay local, the cold ones are read from their owners.")

    def plot(fig) -> None:
        ax = fig.add_subplot(1, 1, 1)
        for name, r in runs.items():
            xs = [5 * i + 2.5 for i in range(len(r["local_share_series_5s"]))]
            ax.plot(xs, r["local_share_series_5s"], marker="o", label=name.replace("_", " "))
        for event, t in runs["edge"]["events_s"].items():
            ax.axvline(t, color="grey", ls="--")
            ax.text(t, 0.02, event, rotation=90)
        ax.set_xlabel("seconds")
        ax.set_ylabel("share of bytes from the local map")
        ax.set_ylim(0, 1.05)
        ax.legend()

    return Report("cluster", asdict(p), {"runs": runs, "target_met": target},
                  Table(["run", "requests", "local share", "local share 2nd half", "fetch p50 ms", "fetch p99 ms",
                         "MB over links", "failed reads", "evicted records"], rows),
                  notes, plot, "prefill CDN: local share with and without the edge tier")
