"""Edge copies on a real node under space pressure: records the node holds without owning them
go before any record it owns, and among edge copies popularity (recent reads, including
co-located ones reported by the client's background Lookups) decides what stays."""

from __future__ import annotations

import time

from kvclient import Client
from kvproto.ring import HashRing
from kvstore.edge import owned_here
from kvstore.ledger import group_id
from tests.test_eviction import LAYERS, KiB, MiB, block, value

SIZE = 256 * KiB  # a block of 4 layers is 1 MiB


def test_edge_copies_go_first_and_popular_ones_stay(make_node):
    node = make_node(map_size_gb=32 / 1024, high_water=0.5)  # 32 MiB map, evict above 16 MiB
    address = f"127.0.0.1:{node.port}"
    # the cluster's ring as this node's agent would hold it: three members, this node is "me:1"
    ring = HashRing(["me:1", "b:1", "c:1"], 64)
    owned = owned_here(lambda: (ring, 2), "me:1")
    node.storage.evictor.keep_first = owned
    mine, edge = [], []
    for i in range(400):
        keys = block(i)
        (mine if owned(group_id(b"", keys[0])) else edge).append(keys)
        if len(mine) >= 6 and len(edge) >= 8:
            break
    mine, edge = mine[:6], edge[:8]  # 6 MiB owned + 8 MiB of edge copies: under the 16 MiB mark
    with Client([address], replication=1) as client:
        for keys in mine + edge:
            client.put_many([(k, value(k, SIZE)) for k in keys])
        popular = edge[:2]
        time.sleep(1.2)  # later than the writes, in the ledger's resolution
        for _ in range(3):  # the two popular documents are read again (co-located or not)
            for keys in popular:
                assert client.get_many(keys) == [value(k, SIZE) for k in keys]
        client.flush()
        time.sleep(1.5)  # the reads' touches reach the ledger (FLUSH_SECONDS) before victims are chosen
        # 3 more owned blocks: 17 MiB > 16 MiB, eviction frees down to 12.8 MiB: 4-5 blocks, fewer
        # than the 6 cold edge copies
        more = []
        for i in range(400, 800):
            keys = block(i)
            if owned(group_id(b"", keys[0])):
                more.append(keys)
            if len(more) == 3:
                break
        for keys in more:
            client.put_many([(k, value(k, SIZE)) for k in keys])
        present = {id(keys): all(client.exists(keys)) for keys in mine + edge + more}
    kept_edge = [i for i, keys in enumerate(edge) if present[id(keys)]]
    evicted = len(edge) - len(kept_edge)
    assert all(present[id(keys)] for keys in mine + more), "an owned block went while edge copies remained"
    assert kept_edge[:2] == [0, 1], f"edge copies kept {kept_edge}: the two popular ones must stay"
    assert evicted >= 3, f"only {evicted} edge copies evicted"
    assert node.storage.evictor.evicted_records == LAYERS * evicted
    assert node.storage.used_bytes() <= 0.5 * 32 * MiB
