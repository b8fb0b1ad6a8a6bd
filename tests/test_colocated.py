"""The co-located fast path against a node in another process: bitwise equal, safe fallback."""

from __future__ import annotations

import os
import shutil


from kvclient import Client
from tests.test_cluster import _keys


def _fill(address: str, n: int = 20) -> dict[bytes, bytes]:
    values = {k: os.urandom(300_000 + i) for i, k in enumerate(_keys(n))}
    with Client([address], replication=1, colocated=False) as writer:
        writer.put_many(list(values.items()))
    return values


def test_colocated_reads_equal_grpc_reads(spawn_node):
    node = spawn_node()
    values = _fill(node.address)
    keys = list(values) + [b"missing-key-xxxxxxxx"]
    with Client([node.address], replication=1, colocated=True) as fast, \
            Client([node.address], replication=1, colocated=False) as slow:
        got_fast = fast.get_many(keys)
        got_slow = slow.get_many(keys)
        assert got_fast == got_slow == [*values.values(), None]
        assert fast.reader(node.address) is not None
        assert fast.reads["colocated"] == len(values)
        seen = {}
        batches = []

        def sink(batch):
            batches.append(len(batch))
            seen.update((i, bytes(view)) for i, view, _ in batch)

        found = fast.read_into(keys, sink)
        assert batches == [len(values)]  # one batch: one read transaction on the node's map
        assert found == [True] * len(values) + [False]
        assert [seen[i] for i in range(len(values))] == list(values.values())


def test_new_writes_are_visible_and_never_half_written(spawn_node):
    node = spawn_node()
    with Client([node.address], replication=1) as client:
        keys = _keys(8)
        assert client.get_many(keys) == [None] * 8
        batch = [(k, os.urandom(1 << 20)) for k in keys]
        client.put_many(batch)  # written over gRPC, one transaction
        assert client.get_many(keys) == [v for _, v in batch]
        assert client.reads["colocated"] == 8


def test_in_process_node_uses_grpc(make_node):
    node = make_node()
    with Client([f"127.0.0.1:{node.port}"], replication=1) as client:
        client.put(b"k" * 10, b"v")
        assert client.get(b"k" * 10) == b"v"
        assert client.reader(f"127.0.0.1:{node.port}") is None


def test_falls_back_when_files_vanish(spawn_node):
    node = spawn_node()
    values = _fill(node.address, 4)
    with Client([node.address], replication=1) as client:
        assert client.reader(node.address) is not None
        shutil.rmtree(node.data_dir)  # files gone; the node still serves from its open map
        assert client.get_many(list(values)) == list(values.values())
        assert client.reader(node.address) is None
        assert client.reads["remote"] >= 4


def test_refuses_another_nodes_files(spawn_node, tmp_path):
    """A node's advertised path that holds another environment (token mismatch) is not read."""
    a, b = spawn_node("a"), spawn_node("b")
    _fill(b.address, 2)
    os.rename(a.data_dir, tmp_path / "a-moved")  # a keeps serving from its open map
    shutil.copytree(b.data_dir, a.data_dir)  # a's path now holds b's environment
    with Client([a.address], replication=1) as client:
        assert client.reader(a.address) is None
        client.put(b"x" * 8, b"still works over gRPC")
        assert client.get(b"x" * 8) == b"still works over gRPC"


def flip_on_disk(data_dir: str, needle: bytes) -> None:
    """Flip one bit of `needle` where it lies in the node's data.mdb (a disk bit-flip)."""
    path = os.path.join(data_dir, "data.mdb")
    with open(path, "r+b") as f:
        data = f.read()
        at = data.find(needle)
        assert at >= 0
        f.seek(at + len(needle) // 2)
        f.write(bytes([data[at + len(needle) // 2] ^ 0x10]))


def test_corrupt_local_record_falls_back_to_grpc_replica(spawn_node):
    a, b = spawn_node(), spawn_node()
    key = _keys(1)[0]
    value = b"good bytes " * 1000
    with Client([a.address, b.address], replication=2) as client:
        client.put(key, value)
        primary = client.ring.owners(key, 2)[0]
        flip_on_disk((a if primary == a.address else b).data_dir, value[:64])
        assert client.get(key) == value
        assert client.reader(primary).corrupt == 1


def test_auth_turns_the_fast_path_off_unless_asked(spawn_node, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("tok-a tenant-a\ntok-b tenant-b\n")
    guarded = spawn_node("guarded", ["--auth-tokens", str(tokens)])
    opened = spawn_node("opened", ["--auth-tokens", str(tokens), "--colocated", "on"])
    for node, expect_reader in ((guarded, False), (opened, True)):
        with Client([node.address], replication=1, token="tok-a") as a, \
                Client([node.address], replication=1, token="tok-b") as b:
            a.put(b"shared-key-0001", b"tenant a's bytes")
            assert a.get(b"shared-key-0001") == b"tenant a's bytes"
            assert (a.reader(node.address) is not None) == expect_reader
            assert b.get(b"shared-key-0001") is None  # the tenant prefix holds on the fast path too
