"""Membership on etcd with a real single-node etcd: join, graceful leave, lease expiry, etcd faults."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from kvclient import Client
from tests.conftest import REPO
from tests import etcd_server
from tests.etcd_server import EtcdServer, needs_etcd

etcd = etcd_server.etcd  # the fixture

pytestmark = needs_etcd
TTL = 2


def etcd_node(spawn_node, server, name=None, ttl=TTL, extra=()):
    return spawn_node(name, ["--etcd", server.endpoint, "--cluster", "t", "--etcd-ttl", str(ttl), *extra])


def wait_for(predicate, timeout: float, step: float = 0.01) -> float:
    """Seconds until predicate() held (TimeoutError past `timeout`)."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"not within {timeout} s")
        time.sleep(step)
    return time.monotonic() - start


def test_join_appears_within_2s_and_leaves_at_once_or_at_lease_expiry(etcd, spawn_node):
    first = etcd_node(spawn_node, etcd)
    with Client(etcd=etcd.endpoint, cluster="t", timeout=3) as client:
        assert client.ring.nodes == (first.address,)
        started = time.monotonic()
        second = etcd_node(spawn_node, etcd)  # returns once it listens (and is registered)
        wait_for(lambda: second.address in client.ring.nodes, 2.0)
        joined = time.monotonic() - started  # process start included
        third = etcd_node(spawn_node, etcd)
        wait_for(lambda: third.address in client.ring.nodes, 2.0)
        assert client.replication == 2
        client.put(b"k" * 32, b"v" * 100)
        assert client.get(b"k" * 32) == b"v" * 100
        second.proc.terminate()  # graceful: the lease is revoked
        left = wait_for(lambda: second.address not in client.ring.nodes, 2.0)
        third.kill()  # SIGKILL: gone when its lease expires, not before
        killed = time.monotonic()
        time.sleep(0.5)
        assert third.address in client.ring.nodes
        wait_for(lambda: third.address not in client.ring.nodes, TTL + 2.0)
        expired = time.monotonic() - killed
        assert client.ring.nodes == (first.address,)
    print(f"join seen {joined:.3f} s after the process started, graceful leave {left:.3f} s, SIGKILL removed after {expired:.2f} s "
          f"(ttl {TTL})")
    assert TTL - 0.6 < expired < TTL + 2.0


def test_etcd_unreachable_at_start_is_one_line_and_nonzero(tmp_path):
    from tests.etcd_server import free_port

    cmd = [sys.executable, "-m", "kvstore.cli", "serve", "--listen", "127.0.0.1:0", "--data", str(tmp_path / "n"),
           "--etcd", f"127.0.0.1:{free_port()}", "--log-level", "ERROR"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=REPO)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "etcd at 127.0.0.1:" in lines[0] and "unreachable" in lines[0], result.stderr
    kvctl = subprocess.run([sys.executable, "-m", "kvclient.cli", "--etcd", f"127.0.0.1:{free_port()}", "ring"],
                           capture_output=True, text=True, timeout=30, cwd=REPO)
    assert kvctl.returncode == 1 and len(kvctl.stderr.strip().splitlines()) == 1, kvctl.stderr


def test_duplicate_node_id_is_refused(etcd, spawn_node):
    etcd_node(spawn_node, etcd, extra=["--node-id", "a"])
    with pytest.raises(RuntimeError, match="node did not start"):
        etcd_node(spawn_node, etcd, extra=["--node-id", "a"])


def test_etcd_lost_while_serving_keeps_the_ring_and_resyncs(tmp_path, spawn_node):
    server = EtcdServer(str(tmp_path / "etcd")).start()
    try:
        a, b = etcd_node(spawn_node, server, ttl=3), etcd_node(spawn_node, server, ttl=3)
        with Client(etcd=server.endpoint, cluster="t", timeout=3) as client:
            wait_for(lambda: len(client.ring.nodes) == 2, 2.0)
            client.put(b"x" * 32, b"value")
            server.stop()
            wait_for(lambda: not client.membership.etcd_connected, 15.0)
            assert set(client.ring.nodes) == {a.address, b.address}  # the last ring stays
            assert client.get(b"x" * 32) == b"value"
            port = server.port
            server = EtcdServer(str(tmp_path / "etcd"))
            server.port = port
            server.start()
            wait_for(lambda: client.membership.etcd_connected, 15.0)
            c = etcd_node(spawn_node, server, ttl=3)
            wait_for(lambda: c.address in client.ring.nodes, 5.0)
            # the nodes registered again (their leases may have lapsed while etcd was down)
            wait_for(lambda: {a.address, b.address} <= set(client.ring.nodes), 10.0)
    finally:
        server.stop()


def test_kvctl_with_etcd_ring_and_status(etcd, spawn_node, tmp_path):
    nodes = [etcd_node(spawn_node, etcd) for _ in range(2)]
    src = tmp_path / "in.bin"
    src.write_bytes(b"payload" * 100)
    run = lambda *a: subprocess.run([sys.executable, "-m", "kvclient.cli", "--etcd", etcd.endpoint,  # noqa: E731
                                     "--cluster", "t", *a], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert run("put", "doc", str(src)).returncode == 0
    ring = json.loads(run("ring").stdout)
    assert set(ring["share"]) == {n.address for n in nodes}
    status = json.loads(run("status").stdout)
    assert set(status["nodes"]) == {n.address for n in nodes}
    assert all(s["state"] == "ready" for s in status["nodes"].values())
    assert {"keys_to_move", "keys_moved", "rate_bytes_per_s"} <= set(status)
