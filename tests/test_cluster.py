"""A 3-node cluster at replication 2: node loss, corruption, and the operator CLI."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

from kvclient import Client
from tests.test_store import _flip_stored_byte


def _keys(n: int) -> list[bytes]:
    return [hashlib.sha256(f"block-{i}".encode()).digest() for i in range(n)]


def test_sigkill_one_node_mid_run_every_read_served(spawn_node):
    nodes = [spawn_node() for _ in range(3)]
    keys = _keys(300)
    values = {k: os.urandom(2000) + k for k in keys}
    with Client([n.address for n in nodes], replication=2, timeout=3) as client:
        client.put_many(list(values.items()))
        failures = 0
        for i, key in enumerate(keys):
            if i == 100:
                nodes[1].kill()
            failures += client.get(key) != values[key]
        assert failures == 0
        assert client.get_many(keys) == [values[k] for k in keys]
        assert client.lookup(keys) == len(keys)


def test_corrupt_replica_is_detected_and_served_from_the_other(make_node):
    nodes = [make_node() for _ in range(3)]
    addrs = [f"127.0.0.1:{n.port}" for n in nodes]
    with Client(addrs, replication=2) as client:
        key = _keys(1)[0]
        client.put(key, b"the real bytes" * 100)
        primary = client.ring.owners(key, 2)[0]
        _flip_stored_byte(nodes[addrs.index(primary)], key, offset=-5)
        assert client.get(key) == b"the real bytes" * 100


def _kvctl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvclient.cli", *args], capture_output=True, text=True, timeout=60)


def test_kvctl_put_get_stat_ring(make_node, tmp_path):
    nodes = [make_node() for _ in range(2)]
    addrs = ",".join(f"127.0.0.1:{n.port}" for n in nodes)
    src = tmp_path / "in.bin"
    src.write_bytes(os.urandom(3 << 20))
    assert _kvctl("--nodes", addrs, "put", "doc-1", str(src)).returncode == 0
    out = tmp_path / "out.bin"
    assert _kvctl("--nodes", addrs, "get", "doc-1", "-o", str(out)).returncode == 0
    assert out.read_bytes() == src.read_bytes()
    stat = json.loads(_kvctl("--nodes", addrs, "stat").stdout)
    assert sum(int(s["records"]) for s in stat.values()) == 2
    ring = json.loads(_kvctl("--nodes", addrs, "ring").stdout)
    assert abs(sum(ring["share"].values()) - 1.0) < 1e-6


@pytest.mark.parametrize(
    "args, message",
    [
        (["get", "missing"], "not found"),
        (["put", "k", "/no/such/file"], "No such file"),
        (["get", "hex:zz"], "bad hex key"),
    ],
)
def test_kvctl_errors_are_one_line(make_node, args, message):
    node = make_node()
    result = _kvctl("--nodes", f"127.0.0.1:{node.port}", *args)
    assert result.returncode != 0
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_kvctl_unreachable_cluster_is_one_line():
    result = _kvctl("--nodes", "127.0.0.1:1", "--timeout", "1", "get", "k")
    assert result.returncode != 0 and "kvctl: error" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_kvstore_cli_bad_listen_is_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "kvstore.cli", "serve", "--listen", "256.1.1.1:99999", "--data", str(tmp_path)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode != 0 and result.stderr.startswith("kvstore: error")


def test_sigterm_is_graceful(spawn_node):
    node = spawn_node()
    with Client([node.address], replication=1) as client:
        client.put(b"k", b"v")
    node.terminate()
    assert node.proc.returncode == 0


def _hits(node) -> float:
    return node.metrics.registry.get_sample_value("kvstore_hits_total") or 0.0


@pytest.mark.parametrize("stripe", [False, True])
def test_striped_reads_spread_a_block_over_its_replicas(make_node, stripe):
    """A block's layer records share one ring position: from primaries one node serves them all;
    striped, every replica serves a third, and the bytes are the same either way."""
    from kvproto.keys import record_key

    nodes = [make_node() for _ in range(3)]
    addrs = [f"127.0.0.1:{n.port}" for n in nodes]
    block = _keys(1)[0]
    keys = [record_key(block, layer) for layer in range(36)]
    values = [hashlib.sha256(key).digest() * 64 for key in keys]
    with Client(addrs, replication=3, stripe=stripe, colocated=False) as client:
        client.put_many(list(zip(keys, values)))
        before = [_hits(n) for n in nodes]
        assert client.get_many(keys) == values
        served = sorted(_hits(n) - b for n, b in zip(nodes, before))
    assert served == ([12, 12, 12] if stripe else [0, 0, 36])
