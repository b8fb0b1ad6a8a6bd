"""The edge tier: a block read from a remote owner is kept on the reading host's node and read
from its map the next time; edge copies are evicted before owned records."""

from __future__ import annotations

import hashlib
import os

from kvclient import Client
from tests import etcd_server
from tests.etcd_server import needs_etcd

etcd = etcd_server.etcd  # the fixture
from tests.test_etcd_membership import etcd_node, wait_for

pytestmark = needs_etcd


def test_remote_reads_become_local_edge_copies(etcd, spawn_node, monkeypatch):
    nodes = [etcd_node(spawn_node, etcd, extra=["--host-id", f"host-{i}"]) for i in range(3)]
    items = {hashlib.sha256(f"edge-{i}".encode()).digest(): os.urandom(4096) for i in range(200)}
    with Client(etcd=etcd.endpoint, cluster="t", timeout=3) as writer:  # no node on this host: no edge
        wait_for(lambda: len(writer.ring.nodes) == 3, 2.0)
        assert writer.edge.local is None
        writer.put_many(list(items.items()))
    monkeypatch.setenv("KVCACHE_HOST_ID", "host-0")  # this process now stands on node 0's host
    with Client(etcd=etcd.endpoint, cluster="t", timeout=3) as client:
        assert client.edge.local == nodes[0].address
        remote = [k for k in items if nodes[0].address not in client.ring.owners(k, 2)]
        assert remote and client.get_many(remote) == [items[k] for k in remote]
        client.flush()
        assert client.edge.kept == len(remote)
        before = dict(client.reads)
        assert client.get_many(remote) == [items[k] for k in remote]
        assert client.reads["colocated"] - before["colocated"] == len(remote)  # served from the local map
        assert client.reads["remote"] == before["remote"]
        # not counted toward replication: the owners still hold every key
        assert all(client.ring.owners(k, 2) for k in remote)
    # the inference path (read_into into a sink) keeps edge copies too
    more = {hashlib.sha256(f"edge-sink-{i}".encode()).digest(): os.urandom(4096) for i in range(100)}
    monkeypatch.delenv("KVCACHE_HOST_ID")
    with Client(etcd=etcd.endpoint, cluster="t", timeout=3) as writer:
        wait_for(lambda: len(writer.ring.nodes) == 3, 2.0)
        writer.put_many(list(more.items()))
    monkeypatch.setenv("KVCACHE_HOST_ID", "host-0")
    with Client(etcd=etcd.endpoint, cluster="t", timeout=3) as client:
        remote = [k for k in more if nodes[0].address not in client.ring.owners(k, 2)]
        got: dict[int, bytes] = {}

        def sink(batch):
            for i, view, _ in batch:
                got[i] = bytes(view)

        assert client.read_into(remote, sink) == [True] * len(remote)
        assert [got[i] for i in range(len(remote))] == [more[k] for k in remote]
        client.flush()
        assert client.edge.kept == len(remote)
        before = dict(client.reads)
        assert client.read_into(remote, sink) == [True] * len(remote)
        assert client.reads["colocated"] - before["colocated"] == len(remote)


def test_edge_copies_are_evicted_before_owned_records():
    from kvproto.ring import HashRing
    from kvstore.edge import owned_here
    from kvstore.ledger import group_id

    ring = HashRing(["a:1", "b:1", "c:1"], 64)
    owned = owned_here(lambda: (ring, 2), "a:1")
    keys = [hashlib.sha256(bytes([i])).digest() + b"\x00\x00" for i in range(64)]
    mine = [k for k in keys if "a:1" in ring.owners(k, 2)]
    assert mine and len(mine) < len(keys)
    entries = sorted(((i, group_id(b"", k), 1) for i, k in enumerate(keys)), key=lambda e: owned(e[1]))
    first = [e for e in entries[: len(keys) - len(mine)]]
    assert all(not owned(gid) for _, gid, _ in first)  # every edge copy goes before any owned group
    assert [i for i, _, _ in first] == sorted(i for i, _, _ in first)  # LRU order kept within the class
