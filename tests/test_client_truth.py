"""A client that tells the truth: deadlines with a hung replica, deletes that stick, repair that
finishes, one co-located attach per node (real nodes, in their own processes where a test
stops or kills them)."""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import threading
import time

import pytest

from kvclient import Client
from kvclient.tombstones import tombstone_key
from tests.test_healing import _copies


def _keys(n: int, tag: str) -> list[bytes]:
    return [hashlib.sha256(f"{tag}-{i}".encode()).digest() for i in range(n)]


def _value(key: bytes) -> bytes:
    return key * 64


# ---- deadlines -------------------------------------------------------------------------------
@pytest.fixture
def stopped(spawn_node):
    """Three nodes; the test SIGSTOPs one (SIGCONT before teardown kills them)."""
    nodes = [spawn_node() for _ in range(3)]
    yield nodes
    for node in nodes:
        os.kill(node.proc.pid, signal.SIGCONT)


def test_every_get_within_3s_with_a_stopped_replica(stopped):
    addrs = [n.address for n in stopped]
    keys = _keys(60, "deadline")
    with Client(addrs, replication=2, timeout=2, colocated=False) as client:
        client.put_many([(k, _value(k)) for k in keys])
        os.kill(stopped[0].proc.pid, signal.SIGSTOP)
        slowest = 0.0
        for key in keys:
            started = time.monotonic()
            assert client.get(key) == _value(key)
            slowest = max(slowest, time.monotonic() - started)
        started = time.monotonic()
        assert client.get_many(keys) == [_value(k) for k in keys]
        batch = time.monotonic() - started
        assert client.exists(keys) == [True] * len(keys)
        assert client.replica_set.hedged > 0
        puts = []
        for i, key in enumerate(_keys(5, "during-stop")):
            started = time.monotonic()
            client.put(key, _value(key))
            puts.append(time.monotonic() - started)
        assert client.hints.pending() > 0  # owed to the stopped node
    print(f"stopped replica, timeout=2: slowest get {slowest:.2f} s, get_many of 60 {batch:.2f} s, "
          f"puts {', '.join(f'{p:.2f}' for p in puts)} s")
    assert slowest < 3.0 and batch < 3.0
    assert max(puts) < 2.5 and sorted(puts)[2] < 1.0  # a node that just failed gets a short grace


def test_stuck_gets_do_not_delay_keys_on_healthy_nodes(stopped):
    addrs = [n.address for n in stopped]
    hung = addrs[0]
    # no hedging: the 8 gets of keys whose first replica is the stopped node stay stuck 2 s
    with Client(addrs, replication=2, timeout=2, colocated=False, stripe=False, hedge_after=30) as client:
        candidates = _keys(400, "stuck")
        on_hung = [k for k in candidates if client.ring.owners(k, 2)[0] == hung][:8]
        healthy = next(k for k in candidates if hung not in client.ring.owners(k, 2))
        client.put_many([(k, _value(k)) for k in [*on_hung, healthy]])
        os.kill(stopped[0].proc.pid, signal.SIGSTOP)
        threads = [threading.Thread(target=lambda k=k: _quiet_get(client, k)) for k in on_hung]
        for t in threads:
            t.start()
        time.sleep(0.2)  # let them take their threads
        started = time.monotonic()
        assert client.get(healthy) == _value(healthy)
        took = time.monotonic() - started
        for t in threads:
            t.join(10)
    print(f"get on healthy nodes behind 8 stuck gets: {took * 1000:.1f} ms")
    assert took < 0.5


def _quiet_get(client: Client, key: bytes) -> None:
    try:
        client.get(key)
    except Exception:  # noqa: BLE001 - a stuck get may time out; only the other get is judged
        pass


def _delivered(client: Client, within: float = 10.0) -> None:
    """Wait until the hints are delivered (a restarted node's channel reconnects within ~1 s)."""
    deadline = time.monotonic() + within
    while client.hints.deliver_now():
        assert time.monotonic() < deadline, "hints not delivered"
        time.sleep(0.1)


# ---- deletes -----------------------------------------------------------------------------------
@pytest.mark.parametrize("colocated", [False, True], ids=["grpc", "colocated"])
def test_a_delete_with_a_replica_down_is_never_served_again(spawn_node, colocated):
    a, b = spawn_node(), spawn_node()
    addrs = [a.address, b.address]
    keys = _keys(30, "deleted")
    with Client(addrs, replication=2, timeout=2, colocated=colocated) as client:
        client.put_many([(k, _value(k)) for k in keys])
        assert client.get_many(keys) == [_value(k) for k in keys]
        if colocated:
            assert client.reader(b.address) is not None  # b's map stays readable while b is down
        b.kill()
        assert client.delete(keys) == 30  # the quorum (1) acknowledged
        assert _copies([a.address], [tombstone_key(k) for k in keys]) == [1] * 30
        assert client.get_many(keys) == [None] * 30
        b.start()  # same port, same files: it still holds every deleted record
        served = sum(client.get(k) is not None for k in keys)  # 30 reads, before and after delivery
        _delivered(client)
        served += sum(v is not None for v in client.get_many(keys))
        assert served == 0 and client.exists(keys) == [False] * 30
        client.flush()
    assert _copies(addrs, keys) == [0] * 30  # nothing written back by read repair
    assert _copies(addrs, [tombstone_key(k) for k in keys]) == [0] * 30  # delivered: tombstones gone
    with Client(addrs, replication=2, timeout=2, colocated=colocated) as fresh:
        assert fresh.get_many(keys) == [None] * 30


def test_tombstones_stop_read_repair_and_the_repair_pass_applies_them(spawn_node):
    """Another client (no hints of its own) reads while the stale replica still holds deleted keys:
    read repair writes nothing back, and `repair` removes the stale copies."""
    a, b = spawn_node(), spawn_node()
    addrs = [a.address, b.address]
    keys = _keys(30, "tomb")
    with Client(addrs, replication=2, timeout=2, colocated=False) as client:
        client.put_many([(k, _value(k)) for k in keys])
        b.kill()
        client.delete(keys)
    b.start()  # the deleting client is gone, its hints with it
    with Client(addrs, replication=2, timeout=2, colocated=False, stripe=False) as other:
        for key in keys:
            other.get(key)
        other.flush()
        assert _copies([a.address], keys) == [0] * 30  # never resurrected on a
        report = other.repair()
        assert report.ok and report.deleted == 30, report
        assert other.get_many(keys) == [None] * 30
    assert _copies(addrs, keys) == [0] * 30
    assert _copies(addrs, [tombstone_key(k) for k in keys]) == [0] * 30


def test_delete_raises_and_checks_its_input(make_node):
    nodes = [make_node() for _ in range(2)]
    addrs = [f"127.0.0.1:{n.port}" for n in nodes]
    from kvproto.errors import InvalidArgument, Unavailable

    with Client(addrs, replication=2, timeout=1) as client:
        client.put(b"here" + bytes(8), b"v")
        assert client.delete(b"here" + bytes(8)) == 2  # one key as bytes, like redis
        with pytest.raises(InvalidArgument, match="empty key"):
            client.delete([b""])
        with pytest.raises(TypeError, match="str"):
            client.delete(["text key"])
        for node in nodes:
            node.stop(0)
        with pytest.raises(Unavailable, match="below write quorum"):
            client.delete([b"gone" + bytes(8)])


# ---- repair --------------------------------------------------------------------------------------
def test_a_node_back_empty_is_refilled_by_repair_without_reads(make_node, tmp_path):
    nodes = [make_node() for _ in range(3)]
    addrs = [f"127.0.0.1:{n.port}" for n in nodes]
    keys = _keys(200, "refill")
    with Client(addrs, replication=2, timeout=5) as client:
        client.put_many([(k, _value(k)) for k in keys])
        port = nodes[0].port
        nodes[0].stop(0)
        make_node(listen=f"127.0.0.1:{port}", data_dir=str(tmp_path / "empty"))  # back, empty
        before = sum(_copies(addrs, keys))
        assert before < 2 * len(keys)
        started = time.monotonic()
        report = client.repair()
        seconds = time.monotonic() - started
    assert _copies(addrs, keys) == [2] * len(keys)
    assert report.ok and report.copies == 2 * len(keys) - before
    print(f"repair of a node back empty: {report.copies} records in {seconds:.2f} s")
    assert seconds < 10


# ---- co-located attach ---------------------------------------------------------------------------
def test_ten_concurrent_first_reads_attach_every_colocated_reader(spawn_node):
    nodes = [spawn_node() for _ in range(3)]
    addrs = [n.address for n in nodes]
    keys = _keys(60, "attach")
    with Client(addrs, replication=2, colocated=False) as writer:
        writer.put_many([(k, _value(k)) for k in keys])
    with Client(addrs, replication=2) as client:
        barrier = threading.Barrier(10)
        results: list[bool] = []

        def first_read() -> None:
            barrier.wait()
            results.append(client.get_many(keys) == [_value(k) for k in keys])

        threads = [threading.Thread(target=first_read) for _ in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert results == [True] * 10
        assert client.local.attached() == dict.fromkeys(addrs, True)
        before = client.reads["colocated"]
        client.get_many(keys)
        assert client.reads["colocated"] - before == len(keys)


# ---- cluster file --------------------------------------------------------------------------------
@pytest.mark.parametrize("field, text, message", [
    ("replication", "null", "'replication' must be an integer"),
    ("replication", "Infinity", "'replication' must be an integer"),
    ("replication", "[1]", "'replication' must be an integer"),
    ("replication", "true", "'replication' must be an integer"),
    ("replication", "0", "'replication' must be from 1"),
    ("vnodes", "3e6", "'vnodes' must be from 1 to 4096"),
    ("vnodes", "2e8", "'vnodes' must be from 1 to 4096"),
    ("vnodes", "1.5", "'vnodes' must be an integer"),
    ("nodes", '["127.0.0.1"]', "has no port"),
    ("nodes", '["http://127.0.0.1:7070"]', "no URL scheme"),
])
def test_a_bad_cluster_file_is_one_line(tmp_path, field, text, message):
    from kvclient.cluster import ClusterSpec

    fields = {"nodes": '["127.0.0.1:7070"]', "replication": "2", "vnodes": "128", field: text}
    path = tmp_path / "cluster.json"
    path.write_text("{" + ", ".join(f'"{k}": {v}' for k, v in fields.items()) + "}")
    started = time.monotonic()
    with pytest.raises(ValueError) as err:
        ClusterSpec.load(str(path))
    assert message in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)
    assert time.monotonic() - started < 0.5
    with pytest.raises(ValueError, match="vnodes"):
        Client(["127.0.0.1:7070"], vnodes=3_000_000)


def test_a_client_keeps_its_ring_when_the_file_turns_bad(make_node, tmp_path, caplog):
    from kvclient.cluster import ClusterSpec

    node = make_node()
    path = tmp_path / "cluster.json"
    ClusterSpec((f"127.0.0.1:{node.port}",), replication=1).save(str(path))
    with Client(str(path), timeout=2) as client:
        client.put(b"kept" + bytes(8), b"v")
        ring = client.ring
        caplog.set_level(logging.WARNING, logger="kvclient.membership")
        for bad in ('{"nodes": ["127.0.0.1:1"], "replication": null}', '{"nodes": ["x:1"], "vnodes": 3e6}'):
            path.write_text(bad)
            os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
            for _ in range(3):
                client.membership._checked_at = 0.0  # the next call looks at the file again
                assert client.get(b"kept" + bytes(8)) == b"v"
            assert client.ring is ring
    lines = [r for r in caplog.records if "keeping the current ring" in r.getMessage()]
    assert len(lines) == 2  # one per bad version of the file, not one per call
