"""Faults: bit flips in the LMDB file, SIGKILL during writes (with and without eviction)."""

from __future__ import annotations

import hashlib
import os
import random
import threading
from collections import defaultdict

import lmdb
import pytest

from kvclient import Client
from kvproto import record
from kvproto.errors import KVCacheError
from kvclient.node import NodeConnection
from kvstore.ledger import COUNT, ENTRY, group_id, usage_key

LAYERS = 4


def value_of(key: bytes) -> bytes:
    """A record whose size and content both derive from its key: any read can be checked."""
    seed = hashlib.sha256(key).digest()
    size = 1 + int.from_bytes(seed[:4], "little") % 300_000
    return (seed * (size // 32 + 1))[:size]


def block(tag: str) -> list[bytes]:
    h = hashlib.sha256(tag.encode()).digest()
    return [h + layer.to_bytes(2, "little") for layer in range(LAYERS)]


def flip_in_file(data_dir: str, needle: bytes, offset: int, bit: int) -> int:
    """Flip one bit at `offset` from every place `needle` lies in data.mdb (LMDB may keep stale
    copies of a page in its free list; the live one is among them). Returns how many."""
    path = os.path.join(data_dir, "data.mdb")
    with open(path, "r+b") as f:
        data = f.read()
        spots = []
        at = data.find(needle)
        while at >= 0:
            spots.append(at)
            at = data.find(needle, at + 1)
        for at in spots:
            f.seek(at + offset)
            f.write(bytes([data[at + offset] ^ (1 << bit)]))
    return len(spots)


def test_every_bit_flip_on_disk_is_detected_and_repairable(make_node):
    node = make_node()
    address = f"127.0.0.1:{node.port}"
    rng = random.Random(20261123)
    keys = [k for i in range(25) for k in block(f"disk-{i}")]  # 100 records, 1 B .. 300 KB
    with Client([address], replication=1) as client:
        client.put_many([(k, value_of(k)) for k in keys])
    H = record.HEADER_SIZE
    # one flip per header field, then random offsets anywhere in the stored value
    targeted = [0, 3, 4, 6, 7, 8, 15, 16, 31, H, -1]
    flipped: dict[bytes, int] = {}
    for n, key in enumerate(rng.sample(keys, 60)):
        payload = value_of(key)
        stored = record.pack(key, payload)
        offset = targeted[n] if n < len(targeted) else rng.randrange(len(stored))
        offset %= len(stored)
        assert flip_in_file(node.storage.path, stored[: H + 8], offset, rng.randrange(8)) >= 1
        flipped[key] = offset
    conn = NodeConnection(address)
    results = list(conn.get(keys, 30))
    assert [i for i, _, _ in results] == list(range(len(keys)))
    for (_, got, corrupt), key in zip(results, keys):
        if key in flipped:
            assert got is None and corrupt, f"flip at offset {flipped[key]} of {key.hex()} not detected"
        else:
            assert got == value_of(key) and not corrupt
    # the node checks the structure (magic, version, flags, length: the first 16 bytes) when it
    # serves; the digest is the reader's to check, once per hop
    corrupt_misses = node.metrics.registry.get_sample_value("kvstore_misses_total", {"reason": "corrupt"})
    assert len(flipped) == 60
    assert corrupt_misses == sum(1 for offset in flipped.values() if offset < 16)
    # a put of the same records repairs exactly the damaged ones (first writer wins otherwise)
    reply = conn.put([(k, value_of(k)) for k in keys], 30)
    assert (reply.stored, reply.existed) == (len(flipped), len(keys) - len(flipped))
    assert [got for _, got, _ in conn.get(keys, 30)] == [value_of(k) for k in keys]
    conn.close()


def check_files(data_dir: str) -> set[bytes]:
    """Open a dead node's files read-only: every record verifies and matches its key, and the
    eviction ledger matches the records exactly. Returns the stored keys."""
    env = lmdb.open(data_dir, readonly=True, lock=True, max_dbs=8, create=False)
    try:
        data, lru, usage = (env.open_db(name, create=False) for name in (b"data", b"lru", b"usage"))
        groups: dict[bytes, int] = defaultdict(int)
        total = 0
        with env.begin(buffers=True) as txn:
            for key, stored in txn.cursor(db=data):
                key = bytes(key)
                payload, _ = record.unpack(key, stored)  # raises Corrupt on a torn or foreign record
                assert bytes(payload) == value_of(key)
                groups[group_id(b"", key)] += len(key) + len(stored)
                total += len(key) + len(stored)
            ledger = {bytes(g): ENTRY.unpack(v)[1] for g, v in txn.cursor(db=lru)}
            charged = txn.get(usage_key(b""), db=usage)
        assert ledger == dict(groups)
        assert (COUNT.unpack(charged)[0] if charged is not None else 0) == total
        return {g for g in groups}
    finally:
        env.close()


@pytest.mark.parametrize("eviction", [False, True], ids=["no-eviction", "evicting"])
def test_sigkill_during_writes_loses_no_acked_write_and_tears_nothing(spawn_node, eviction):
    extra = ["--map-size-gb", str(48 / 1024), "--high-water", "0.5"] if eviction else ["--high-water", "1"]
    node = spawn_node(extra=extra)
    rng = random.Random(7 + eviction)
    acked: list[list[bytes]] = []
    attempted: list[list[bytes]] = []
    for round_ in range(3):
        killer = threading.Timer(rng.uniform(0.4, 0.9), node.kill)
        killer.start()
        with Client([node.address], replication=1, timeout=3, colocated=False) as client:
            for n in range(100_000):
                keys = block(f"kill-{eviction}-{round_}-{n}")
                attempted.append(keys)
                try:
                    client.put_many([(k, value_of(k)) for k in keys])
                except KVCacheError:
                    break
                acked.append(keys)
        killer.join()
        assert node.proc.poll() is not None, "the node outlived the writes"
        check_files(node.data_dir)
        node.start()  # same data dir, same port
        with Client([node.address], replication=1, timeout=10, colocated=False) as client:
            for keys in attempted:
                got = client.get_many(keys)
                assert all(v is None or v == value_of(k) for k, v in zip(keys, got)), "a torn record was served"
                assert all(v is None for v in got) or None not in got, "a block is stored in part"
            if not eviction:
                for keys in acked:
                    assert client.get_many(keys) == [value_of(k) for k in keys], "an acknowledged write was lost"
            stat = client.stat()[node.address]
    # each round ends with exactly one write the kill interrupted
    assert len(acked) >= 3 and len(attempted) == len(acked) + 3
    if eviction:
        assert stat["evicted_records"] > 0
    node.terminate()
    check_files(node.data_dir)
