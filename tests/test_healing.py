"""Healing: node loss under read load, hinted handoff, read repair, membership change + rebalance."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

from kvclient import Client
from kvclient.cluster import ClusterSpec
from kvclient.node import NodeConnection


def _value(key: bytes) -> bytes:
    return key * 40  # derived from the key, so any read can be checked


def _keys(n: int, tag: str = "k") -> list[bytes]:
    return [hashlib.sha256(f"{tag}-{i}".encode()).digest() for i in range(n)]


def _copies(addresses: list[str], keys: list[bytes]) -> list[int]:
    counts = [0] * len(keys)
    for address in addresses:
        conn = NodeConnection(address)
        for i, present in enumerate(conn.lookup(keys, 10)):
            counts[i] += present
        conn.close()
    return counts


def test_10k_reads_through_kill_and_restart_then_two_copies(spawn_node):
    nodes = [spawn_node() for _ in range(3)]
    addrs = [n.address for n in nodes]
    keys = _keys(500)
    failed = 0
    with Client(addrs, replication=2, timeout=2, colocated=False) as client:
        client.put_many([(k, _value(k)) for k in keys[:250]])
        for i in range(10_000):
            if i == 2_000:
                nodes[0].kill()
                client.put_many([(k, _value(k)) for k in keys[250:]])  # written during the outage
            if i == 6_000:
                nodes[0].start()  # same port, same data dir
            written = keys if i >= 2_000 else keys[:250]
            key = written[i % len(written)]
            failed += client.get(key) != _value(key)
        assert failed == 0
        assert client.hints.deliver_now() == 0  # the restarted node answers: every hint delivered
        client.get_many(keys)  # read repair for anything still short
        client.flush()
        assert _copies(addrs, keys) == [2] * len(keys)


def test_read_repair_restores_a_missing_replica(make_node):
    nodes = [make_node() for _ in range(2)]
    addrs = [f"127.0.0.1:{n.port}" for n in nodes]
    key = _keys(1)[0]
    with Client(addrs, replication=2, stripe=False) as client:
        client.put(key, _value(key))
        primary = client.ring.owners(key, 2)[0]
        NodeConnection(primary).delete([key], 5)
        assert client.get(key) == _value(key)
        assert client.repairs == 1
        client.flush()
        assert _copies(addrs, [key]) == [2]


def _kvctl(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "kvclient.cli", *args], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_join_and_leave_move_about_k_over_n(make_node, tmp_path):
    nodes = [make_node() for _ in range(5)]
    addrs = [f"127.0.0.1:{n.port}" for n in nodes]
    old, new = tmp_path / "old.json", tmp_path / "cluster.json"
    ClusterSpec(tuple(addrs[:4]), replication=2).save(str(old))
    ClusterSpec(tuple(addrs[:4]), replication=2).save(str(new))
    keys = _keys(2000)
    with Client(str(new)) as client:
        client.put_many([(k, b"v" + k) for k in keys])
        records = 2 * len(keys)
        # join: the fifth node enters the cluster file; the client picks it up without restart
        ClusterSpec(tuple(addrs), replication=2).save(str(new))
        assert client.refresh(force=True) and len(client.ring.nodes) == 5
        joined = _kvctl("--nodes", str(new), "rebalance", "--previous", str(old), "--prune")
        assert joined["copies"] <= 1.2 * records / 5, joined
        assert _copies(addrs, keys) == [2] * len(keys)
        assert client.get_many(keys[:50]) == [b"v" + k for k in keys[:50]]
        # leave: the first node goes away
        ClusterSpec(tuple(addrs), replication=2).save(str(old))
        ClusterSpec(tuple(addrs[1:]), replication=2).save(str(new))
        left = _kvctl("--nodes", str(new), "rebalance", "--previous", str(old))
        assert left["copies"] <= 1.2 * records / 5, left
        assert _copies(addrs[1:], keys) == [2] * len(keys)
    print("rebalance figures:", json.dumps({"records": records, "join": joined, "leave": left}))


def test_cluster_file_errors_are_readable(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"nodes": []}')
    out = subprocess.run([sys.executable, "-m", "kvclient.cli", "--nodes", str(bad), "stat"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "non-empty list" in out.stderr
