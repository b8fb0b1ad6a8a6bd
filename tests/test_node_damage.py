"""A damaged file never kills a process: structural damage to a real node's LMDB file, real
signals, real replicas. The damaged node says it needs a rebuild; reads come from the replica."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests import lmdb_damage
from tests.conftest import REPO
from kvclient import Client
from kvclient.node import NodeConnection
from kvstore import scrub
from kvstore.storage import IncomingRecord, Storage

RECORDS = 300  # enough 34-byte keys for the data database to have branch pages


def _items(n: int = RECORDS, size: int = 20_000) -> list[tuple[bytes, bytes]]:
    return [(b"%032d" % i + (i % 3).to_bytes(2, "little"), os.urandom(size)) for i in range(n)]


# (damage, whether the whole file needs a rebuild; a pointer to another record's pages is one
# corrupt record, caught by its key-bound digest, and repaired by the next write)
CASES = [(d, d is not lmdb_damage.damage_overflow_pointer) for d in lmdb_damage.DAMAGES]


@pytest.mark.parametrize("damage,rebuild", CASES, ids=[d.__name__[7:] for d, _ in CASES])
def test_structural_damage_leaves_every_process_alive(spawn_node, damage, rebuild):
    a, b = spawn_node("a"), spawn_node("b")
    items = _items()
    with Client([a.address, b.address], replication=2, write_quorum=2) as client:
        client.put_many(items)
    a.terminate()
    damage(a.data_dir)
    a.start()  # the node comes up (its scrub ran in a child) and keeps answering
    # this process reads both nodes' files through the co-located path where they allow it
    with Client([a.address, b.address], replication=2) as client:
        assert client.get_many([k for k, _ in items]) == [v for _, v in items]
        assert client.exists([k for k, _ in items]) == [True] * len(items)
        stat = client.conn(a.address).stat(5.0)
    assert a.proc.poll() is None and b.proc.poll() is None
    assert bool(stat.needs_rebuild) == rebuild, stat.needs_rebuild
    # a node that needs a rebuild refuses the co-located path, and reads over gRPC are CORRUPT
    conn = NodeConnection(a.address)
    try:
        got = list(conn.get([items[-1][0]], 5.0))
        assert (got[0][1] is None) == rebuild
        if rebuild:
            with pytest.raises(Exception, match="rebuild"):
                conn.local_info(5.0)
    finally:
        conn.close()
    assert a.proc.poll() is None


def test_a_rebuilt_node_is_refilled_from_its_replica(spawn_node):
    a, b = spawn_node("a"), spawn_node("b")
    items = _items(120)
    with Client([a.address, b.address], replication=2, write_quorum=2) as client:
        client.put_many(items)
    a.terminate()
    lmdb_damage.damage_size_field(a.data_dir)
    a.start()
    assert NodeConnection(a.address).stat(5.0).needs_rebuild
    refused = subprocess.run([sys.executable, "-m", "kvstore.cli", "rebuild", "--data", a.data_dir],
                             capture_output=True, text=True, cwd=REPO, timeout=60)
    assert refused.returncode == 2 and "in use by node pid" in refused.stderr  # the node still runs
    a.terminate()
    done = subprocess.run([sys.executable, "-m", "kvstore.cli", "rebuild", "--data", a.data_dir],
                          capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode == 0 and "kvctl" in done.stdout and "repair" in done.stdout
    a.start()
    with Client([a.address, b.address], replication=2) as client:
        report = client.repair()
        assert report.ok and report.moved == len(items)
    conn = NodeConnection(a.address)
    try:
        stat = conn.stat(5.0)
        assert not stat.needs_rebuild and stat.records == len(items)
        assert [v for _, v, _ in conn.get([k for k, _ in items], 10.0)] == [v for _, v in items]
    finally:
        conn.close()


def test_the_scrubber_reports_what_kills_a_reader(tmp_path):
    """Each damage named: SIGBUS and SIGABRT end the scrub's child, not this process."""
    seen = {}
    for damage in lmdb_damage.DAMAGES:
        path = str(tmp_path / damage.__name__)
        storage = Storage(path, 1 << 28, sync=False)
        storage.put_batch(IncomingRecord.of(k, v) for k, v in _items(RECORDS, 12_000))
        storage.close()
        damage(path)
        report = scrub.run(path, digests=True)
        seen[damage.__name__] = report
        reopened = Storage(path, 1 << 28, sync=False)
        try:
            assert bool(reopened.damaged) == (not report.ok)
            assert bool(reopened.stats().needs_rebuild) == (not report.ok)
        finally:
            reopened.close()
    assert "SIGBUS" in seen["damage_size_field"].reason
    assert "SIGABRT" in seen["damage_branch_child"].reason
    assert "truncated" in seen["damage_truncate"].reason
    assert seen["damage_overflow_pointer"].ok and seen["damage_overflow_pointer"].bad_records == 1


def _dead_reader(path: str, key: bytes) -> subprocess.Popen:
    """A co-located client process that stops inside a read transaction (to be SIGKILLed)."""
    code = f"""
import sys, time
sys.path.insert(0, {REPO!r})
from kvclient.colocated import ColocatedReader
import lmdb
env = lmdb.open({path!r}, readonly=True, lock=True, max_dbs=4, create=False)
env.set_mapsize(0)
db = env.open_db(b"data", create=False)
txn = env.begin(db=db, buffers=True)
assert txn.get({key!r}) is not None
print("inside", flush=True)
time.sleep(120)
"""
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert proc.stdout.readline().strip() == "inside"
    return proc


def test_a_reader_killed_inside_its_transaction_costs_nothing(spawn_node):
    """A co-located reader SIGKILLed inside a read transaction, then 4x the map size written
    and deleted: every put succeeds and every bystander record is still there."""
    node = spawn_node(extra=["--map-size-gb", "0.0625"])  # 64 MiB
    bystanders = [(b"by%030d" % i + bytes(2), os.urandom(64 << 10)) for i in range(20)]
    conn = NodeConnection(node.address)
    try:
        conn.put(bystanders, 30.0)
        reader = _dead_reader(node.data_dir, bystanders[0][0])
        reader.send_signal(signal.SIGKILL)
        reader.wait(10)
        chunk = os.urandom(1 << 20)
        written = 0
        start = time.monotonic()
        for batch in range(64):  # 4 x 64 MiB in 4 MiB puts, each deleted after
            keys = [b"w%031d" % (batch * 4 + j) + bytes(2) for j in range(4)]
            conn.put([(k, chunk) for k in keys], 30.0)
            assert conn.delete(keys, 30.0) == 4
            written += 4 << 20
        assert written == 4 * (64 << 20) and time.monotonic() - start < 120
        got = {i: v for i, v, _ in conn.get([k for k, _ in bystanders], 10.0)}
        assert [got[i] for i in range(len(bystanders))] == [v for _, v in bystanders]
        assert conn.stat(5.0).evicted_records == 0
    finally:
        conn.close()
