"""Hosts in tests: each host is a network namespace behind one switch (tc tbf links), with its own
node (`kvstore serve --etcd ... --host-id HOSTn` on the host's address) and its own client
process inside the namespace ($KVCACHE_HOST_ID=HOSTn, tests/host_client.py); etcd runs in the
switch namespace. "Another host" then means another address across a shaped link, as in
production: the co-located check, the edge tier and membership are checked across hosts.

The lab is `kvbench cluster`'s (bench.cluster.SwitchLab). The tests share one cluster and run in
file order: the last one SIGKILLs the node of the fourth host.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass

import pytest

from bench.cluster import ETCD_IP, SwitchLab
from bench.netns import netns_unavailable_reason
from kvstore.process import stop_process
from tests.conftest import REPO
from tests.etcd_server import ETCD, needs_etcd

NETNS_SKIP = netns_unavailable_reason()
pytestmark = [needs_etcd, pytest.mark.skipif(NETNS_SKIP is not None, reason=f"host namespaces: {NETNS_SKIP}")]

HOSTS = 4  # hosts 0-2 run a client too; host 3's node is the one SIGKILLed
RATE_BPS = 500_000_000
TTL = 2
PORT = 7070
ETCD_ENDPOINT = f"{ETCD_IP}:2379"
ENV = {**os.environ, "PYTHONPATH": REPO, "GRPC_VERBOSITY": "NONE"}


class Lines:
    """A child's stdout as a queue of lines (a read with a deadline; a dead child shows)."""

    def __init__(self, proc: subprocess.Popen, what: str) -> None:
        self.proc, self.what = proc, what
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def next(self, timeout: float) -> str:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"{self.what}: no answer within {timeout} s") from None
        if line is None:
            raise RuntimeError(f"{self.what} exited with {self.proc.wait(5)}")
        return line


class HostClient:
    """tests/host_client.py in a host's namespace: call(op, ...) -> its JSON answer."""

    def __init__(self, lab: SwitchLab, i: int) -> None:
        self.proc = subprocess.Popen(
            lab_argv(lab, i, [sys.executable, "-m", "tests.host_client", "--etcd", ETCD_ENDPOINT, "--timeout", "3"]),
            cwd=REPO, env={**ENV, "KVCACHE_HOST_ID": host_id(i)}, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True)
        self.out = Lines(self.proc, f"client on host {i}")

    def send(self, op: str, **args) -> None:
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()

    def answer(self, timeout: float = 30.0) -> dict:
        reply = json.loads(self.out.next(timeout))
        assert "error" not in reply, f"{self.out.what}: {reply['error']}"
        return reply

    def call(self, op: str, timeout: float = 30.0, **args) -> dict:
        self.send(op, **args)
        return self.answer(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()  # the helper's loop ends, its client closes
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@dataclass
class Cluster:
    lab: SwitchLab
    nodes: list[subprocess.Popen]
    clients: list[HostClient]

    def address(self, i: int) -> str:
        return f"{self.lab.ip(i)}:{PORT}"

    def rx_bytes(self, i: int) -> int:
        """Bytes that came into host i over its link (its veth end, read inside its namespace)."""
        path = f"/sys/class/net/{self.lab.devs[i]}/statistics/rx_bytes"
        out = subprocess.run(lab_argv(self.lab, i, ["cat", path]), capture_output=True, text=True, timeout=10,
                             check=True)
        return int(out.stdout)


def host_id(i: int) -> str:
    return f"HOST{i}"


def lab_argv(lab: SwitchLab, i: int | None, argv: list[str]) -> list[str]:
    return ["ip", "netns", "exec", lab.switch if i is None else lab.hosts[i], *argv]


def start_etcd(lab: SwitchLab, data_dir: str) -> subprocess.Popen:
    url, peer = f"http://{ETCD_ENDPOINT}", f"http://{ETCD_IP}:2380"
    proc = subprocess.Popen(lab_argv(lab, None, [
        ETCD, "--name", "t", "--data-dir", data_dir, "--listen-client-urls", url, "--advertise-client-urls", url,
        "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer, "--initial-cluster", f"t={peer}",
        "--log-level", "error", "--logger", "zap"]), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # etcd's /health from inside the switch namespace (this process cannot reach it)
    poll = ("import time, urllib.request\nfor _ in range(400):\n    try:\n"
            f"        if b'true' in urllib.request.urlopen('{url}/health', timeout=1).read(): break\n"
            "    except OSError: time.sleep(0.05)\nelse: raise SystemExit('etcd not healthy')")
    subprocess.run(lab_argv(lab, None, [sys.executable, "-c", poll]), check=True, timeout=30)
    return proc


def start_node(lab: SwitchLab, i: int, data_dir: str) -> subprocess.Popen:
    return subprocess.Popen(lab_argv(lab, i, [
        sys.executable, "-m", "kvstore.cli", "serve", "--listen", f"{lab.ip(i)}:{PORT}", "--data", data_dir,
        "--map-size-gb", "1", "--no-sync", "--etcd", ETCD_ENDPOINT, "--cluster", "hosts", "--etcd-ttl", str(TTL),
        "--host-id", host_id(i), "--log-level", "WARNING"]), cwd=REPO, env=ENV, stdout=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    work = tmp_path_factory.mktemp("hosts")
    with ExitStack() as stack:  # each resource is released even when starting a later one fails
        lab = stack.enter_context(SwitchLab(HOSTS, RATE_BPS))
        etcd = start_etcd(lab, str(work / "etcd"))
        stack.callback(stop_process, etcd, 5.0)
        nodes = []
        for i in range(HOSTS):  # started together, then each waited for
            nodes.append(start_node(lab, i, str(work / f"node{i}")))
            stack.callback(stop_process, nodes[-1], 5.0)
        for i, node in enumerate(nodes):
            line = Lines(node, f"node on host {i}").next(60)
            assert "listening on" in line, f"node on host {i}: {line!r}"
        clients = []
        for i in range(HOSTS - 1):
            clients.append(HostClient(lab, i))
            stack.callback(clients[-1].close)
        for i, client in enumerate(clients):
            assert client.answer(60) == {"started": host_id(i)}
            ready = client.call("ready", nodes=HOSTS, timeout=60)
            assert ready["local"] == f"{lab.ip(i)}:{PORT}", ready  # its host's node, by host id
        yield Cluster(lab, nodes, clients)


def owners(cluster: Cluster, name: str, count: int) -> list[set[str]]:
    return [set(o) for o in cluster.clients[0].call("owners", name=name, count=count)["owners"]]


def test_colocated_map_only_for_the_node_of_the_clients_own_host(cluster):
    a, b = cluster.address(0), cluster.address(1)
    size, placed = 64 << 10, owners(cluster, "coloc", 96)
    on_a = [i for i, o in enumerate(placed) if a in o]
    b_not_a = [i for i, o in enumerate(placed) if b in o and a not in o]
    assert on_a and b_not_a
    cluster.clients[1].call("put", name="coloc", indices=list(range(96)), size=size)  # written from host 1
    client = cluster.clients[0]

    rx = cluster.rx_bytes(0)
    local = client.call("read", name="coloc", indices=on_a, size=size)
    local_link = cluster.rx_bytes(0) - rx
    assert (local["colocated"], local["remote"], local["missing"], local["wrong"]) == (len(on_a), 0, 0, 0), local
    assert local["attached"][a] is True, local
    rx = cluster.rx_bytes(0)
    remote = client.call("read", name="coloc", indices=b_not_a, size=size)
    remote_link = cluster.rx_bytes(0) - rx
    assert (remote["colocated"], remote["remote"], remote["missing"], remote["wrong"]) == (0, len(b_not_a), 0, 0)
    assert remote["attached"][b] is False, remote  # host 1's node: never through its map
    print(f"host 0 read {len(on_a)} records of its node through the map ({local_link} B over its link) and "
          f"{len(b_not_a)} of host 1's over the network ({remote_link} B)")
    assert remote_link >= len(b_not_a) * size, "host 1's records did not cross host 0's link"
    assert local_link < len(on_a) * size / 20, "co-located reads moved bytes over the link"

    # the files are readable from host 0 (one filesystem), the host identity alone says no
    refused = client.call("probe", node=b, as_host=host_id(0))
    assert refused == {"attached": False, "node_host": host_id(1), "readable": True}, refused
    pretending = client.call("probe", node=b, as_host=host_id(1))
    assert pretending["attached"] is True, pretending  # the same process calling itself HOST1 attaches


def test_edge_copy_a_document_crosses_the_link_once(cluster):
    c = cluster.address(2)
    size, count = 64 << 10, 64  # a 4 MiB document, none of it owned by host 2's node
    doc = [i for i, o in enumerate(owners(cluster, "doc", 4 * count)) if c not in o][:count]
    assert len(doc) == count
    cluster.clients[0].call("put", name="doc", indices=doc, size=size)  # written on host 0
    reader = cluster.clients[2]

    rx = cluster.rx_bytes(2)
    first = reader.call("read", name="doc", indices=doc, size=size)
    first_link = cluster.rx_bytes(2) - rx
    assert (first["colocated"], first["remote"], first["missing"], first["wrong"]) == (0, count, 0, 0), first
    assert reader.call("flush")["kept"] >= count  # the edge copies are on host 2's node
    rx = cluster.rx_bytes(2)
    second = reader.call("read", name="doc", indices=doc, size=size)
    second_link = cluster.rx_bytes(2) - rx
    assert (second["colocated"], second["remote"], second["missing"], second["wrong"]) == (count, 0, 0, 0), second
    print(f"document of {count * size} B written on host 0, read on host 2: first read {first_link} B over "
          f"host 2's link, second read {second_link} B")
    assert first_link >= count * size, "the first read did not cross the link"
    assert second_link < count * size / 50, "the second read was not served from host 2's own node"


def test_sigkill_of_one_host_no_failed_read_on_the_others_ring_drops_it_at_lease_expiry(cluster):
    victim = cluster.address(HOSTS - 1)
    count, size = 256, 4096
    placed = owners(cluster, "ring", count)
    assert sum(victim in o for o in placed) > count / 4
    cluster.clients[0].call("put", name="ring", indices=list(range(count)), size=size)
    for client in cluster.clients:
        client.send("loop", name="ring", count=count, size=size, victim=victim, max_s=TTL + 15.0, after_drop_s=1.0)
    for client in cluster.clients:
        assert "looping" in client.answer(30)  # every client is reading when the node dies
    cluster.nodes[-1].kill()
    killed = time.monotonic()
    results = [client.answer(TTL + 30.0) for client in cluster.clients]
    for i, r in enumerate(results):
        assert r["failed"] == 0, f"host {i}: {r['failed']} of {r['reads']} reads failed: {r['errors']}"
        assert r["dropped_at"] is not None and victim not in r["ring"], f"host {i}: the ring kept {victim}"
        dead = sum(killed < t < r["dropped_at"] for t in r["rounds"])
        after = sum(t > r["dropped_at"] for t in r["rounds"])
        assert dead and after, f"host {i}: {dead} rounds while the node was dead in the ring, {after} after"
    drops = [r["dropped_at"] - killed for r in results]
    print(f"SIGKILL on host {HOSTS - 1}: rings dropped it after {min(drops):.2f}-{max(drops):.2f} s (ttl {TTL}); "
          f"{sum(r['reads'] for r in results)} reads on 3 hosts, 0 failed")
    assert all(TTL - 0.6 < d < TTL + 3.0 for d in drops), drops
