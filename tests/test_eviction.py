"""Eviction and quotas: LRU of whole blocks under a high-water mark, per-tenant byte quotas."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections import defaultdict

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from kvclient import Client, QuotaExceeded
from kvproto import record
from kvstore.auth import tenant_prefix
from kvstore.eviction import LOW_WATER
from kvstore.ledger import ENTRY, group_id
from kvstore.storage import IncomingRecord, Storage

KiB, MiB = 1 << 10, 1 << 20
LAYERS = 4


def block(i: int, tag: str = "doc") -> list[bytes]:
    """The record keys of block i: h_i ‖ uint16 layer, as inference writes them."""
    h = hashlib.sha256(f"{tag}-{i}".encode()).digest()
    return [h + layer.to_bytes(2, "little") for layer in range(LAYERS)]


def value(key: bytes, size: int) -> bytes:
    """Content derived from the key, so every read can be checked."""
    return (hashlib.sha256(key).digest() * (size // 32 + 1))[:size]


def incoming(keys: list[bytes], size: int) -> list[IncomingRecord]:
    return [IncomingRecord.of(k, value(k, size)) for k in keys]


def test_lru_evicts_whole_cold_blocks_keeps_hot_ones_and_reuses_pages(make_node):
    node = make_node(map_size_gb=32 / 1024, high_water=0.5)  # 32 MiB map, evict above 16 MiB
    limit = 0.5 * 32 * MiB
    address = f"127.0.0.1:{node.port}"
    size = 256 * KiB  # a block of 4 layers is 1 MiB
    blocks = [block(i) for i in range(60)]  # 60 MiB written in all: twice the map
    with Client([address], replication=1) as client:
        for i, keys in enumerate(blocks):
            client.put_many([(k, value(k, size)) for k in keys])
            assert client.get(blocks[0][i % LAYERS]) == value(blocks[0][i % LAYERS], size)  # block 0 is hot
            assert node.storage.used_bytes() <= limit
        present = [client.exists(keys) for keys in blocks]
        for keys, flags in zip(blocks, present):
            assert all(flags) or not any(flags), "a block was evicted in part"
            if all(flags):
                assert client.get_many(keys) == [value(k, size) for k in keys]
        kept = [i for i, flags in enumerate(present) if all(flags)]
        assert kept[0] == 0  # read on every round: never the least recently used
        cold = kept[1:]
        assert cold == list(range(cold[0], 60))  # the survivors are the most recent blocks
        stat = client.stat()[address]
    evicted_blocks = 60 - len(kept)
    assert evicted_blocks > 0 and stat["evicted_records"] == LAYERS * evicted_blocks
    assert node.metrics.evictions._value.get() == LAYERS * evicted_blocks
    # freed pages are reused: the data file never grew past the mark plus one batch
    assert node.storage.stats().file_bytes <= limit + 2 * MiB
    # after the last eviction the store sits between the low-water mark and high water
    assert len(kept) * MiB >= LOW_WATER * limit * 0.8


def test_a_put_that_cannot_fit_is_refused_without_flushing_the_cache(make_node):
    node = make_node(map_size_gb=32 / 1024, high_water=0.5)
    with Client([f"127.0.0.1:{node.port}"], replication=1) as client:
        keys = block(0)
        client.put_many([(k, value(k, 256 * KiB)) for k in keys])
        huge = [(f"big-{i}".encode(), value(b"%d" % i, MiB)) for i in range(16)]  # 16 MiB at once
        with pytest.raises(QuotaExceeded):
            client.put_many(huge)
        assert client.get_many(keys) == [value(k, 256 * KiB) for k in keys]
        assert node.storage.stats().evicted_records == 0


def test_pinned_pages_full_map_is_resource_exhausted_and_reads_go_on(make_node):
    """A long read transaction (e.g. a co-located reader) pins freed pages: eviction cannot make
    room, the put fails with RESOURCE_EXHAUSTED, reads keep working, and writes resume after."""
    node = make_node(map_size_gb=16 / 1024, high_water=0.9)
    size = 256 * KiB
    with Client([f"127.0.0.1:{node.port}"], replication=1) as client:
        client.put_many([(k, value(k, size)) for k in block(0)])
        pin = node.storage.env.begin()  # keeps every page of this snapshot from reuse
        try:
            with pytest.raises(QuotaExceeded):
                for i in range(1, 40):
                    client.put_many([(k, value(k, size)) for k in block(i)])
            stored = [i for i in range(40) if all(client.exists(block(i)))]
            for i in stored:
                assert client.get_many(block(i)) == [value(k, size) for k in block(i)]
        finally:
            pin.abort()
        for i in range(40, 60):  # pages are reusable again: eviction keeps the store going
            client.put_many([(k, value(k, size)) for k in block(i)])
        assert all(client.exists(block(59)))


def test_tenant_quota_evicts_only_the_tenants_own_blocks(make_node, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("alpha-token-0123456789 alpha\nbeta-token-0123456789 beta\n")
    size = 64 * KiB  # a block: 4 × (34 + 16 prefix + 32 header + 64 KiB) = 262,472 bytes
    quota = MiB  # room for three blocks
    node = make_node(auth_tokens_file=str(tokens), tenant_quota_bytes=quota)
    address = f"127.0.0.1:{node.port}"
    with Client([address], replication=1, token="alpha-token-0123456789") as alpha, \
            Client([address], replication=1, token="beta-token-0123456789") as beta:
        beta.put_many([(k, value(k, size)) for i in range(2) for k in block(i, "beta")])  # oldest of all
        for i in range(10):
            alpha.put_many([(k, value(k, size)) for k in block(i, "alpha")])
            assert node.storage.tenant_usage(tenant_prefix("alpha")) <= quota
        present = [all(alpha.exists(block(i, "alpha"))) for i in range(10)]
        assert present == [False] * 7 + [True] * 3
        assert all(not any(alpha.exists(block(i, "alpha"))) for i in range(7))  # whole blocks only
        assert all(all(beta.exists(block(i, "beta"))) for i in range(2))  # never beta's
        assert node.storage.stats().evicted_records == 7 * LAYERS

        # a batch larger than the quota: refused, and nothing of alpha's evicted for it
        with pytest.raises(QuotaExceeded):
            alpha.put_many([(k, value(k, size)) for i in range(10, 15) for k in block(i, "alpha")])
        assert [all(alpha.exists(block(i, "alpha"))) for i in range(7, 10)] == [True] * 3
        assert node.storage.stats().evicted_records == 7 * LAYERS

        # usage follows deletes, charged as key + stored value bytes
        used = node.storage.tenant_usage(tenant_prefix("alpha"))
        assert used == 3 * LAYERS * (16 + 34 + record.HEADER_SIZE + size)
        assert alpha.delete(block(9, "alpha")) == LAYERS
        assert node.storage.tenant_usage(tenant_prefix("alpha")) == used - LAYERS * (16 + 34 + 32 + size)


@pytest.mark.parametrize("flags", [["--high-water", "1.5"], ["--high-water", "0"], ["--tenant-quota-gb", "-1"]])
def test_bad_eviction_flags_are_one_cli_line(tmp_path, flags):
    result = subprocess.run(
        [sys.executable, "-m", "kvstore.cli", "serve", "--listen", "127.0.0.1:0", "--data", str(tmp_path), *flags],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2 and result.stderr.startswith("kvstore: error: --")
    assert len(result.stderr.strip().splitlines()) == 1


def test_ledger_survives_restart_and_is_rebuilt_for_old_stores(tmp_path):
    path = str(tmp_path / "store")
    storage = Storage(path, 64 * MiB, sync=False, high_water=0.5)
    for i in range(4):
        storage.put_batch(incoming(block(i), 1000))
    storage.put_batch(incoming([b"generic"], 5000))
    with storage.env.begin() as txn:
        before = dict(txn.cursor(db=storage.ledger.lru))
    usage = storage.tenant_usage()
    storage.close()
    # a store written before the ledger existed: no ledger dbs, no version mark
    storage = Storage(path, 64 * MiB, sync=False)
    with storage.env.begin(write=True) as txn:
        txn.drop(storage.ledger.lru, delete=False)
        txn.drop(storage.ledger.usage_db, delete=False)
        txn.delete(b"ledger_version", db=storage.meta_db)
    storage.close()
    storage = Storage(path, 64 * MiB, sync=False)
    with storage.env.begin() as txn:
        after = dict(txn.cursor(db=storage.ledger.lru))
    assert storage.tenant_usage() == usage
    assert {g: ENTRY.unpack(v)[1] for g, v in after.items()} == {g: ENTRY.unpack(v)[1] for g, v in before.items()}
    assert len(after) == 5  # four blocks and one generic key
    storage.close()


def test_reads_refresh_recency_at_the_next_flush(tmp_path):
    storage = Storage(str(tmp_path / "s"), 64 * MiB, sync=False, high_water=0.9)
    try:
        storage.put_batch(incoming(block(0), 1000))
        storage.put_batch(incoming(block(1), 1000))

        def last_access(i: int) -> int:
            with storage.env.begin() as txn:
                return ENTRY.unpack(txn.get(group_id(b"", block(i)[0]), db=storage.ledger.lru))[0]

        assert last_access(0) < last_access(1)
        assert storage.get(block(0)[2]) == value(block(0)[2], 1000)  # any layer touches the block
        storage.evictor.flush()  # what the background flusher does every FLUSH_SECONDS
        assert last_access(0) > last_access(1)
    finally:
        storage.close()


# ---- a property: the ledger always matches the records, eviction never splits a group --------
TENANTS = [b"", tenant_prefix("a"), tenant_prefix("b")]
OPS = st.lists(
    st.tuples(
        st.sampled_from(["put", "put", "put", "delete", "read"]),
        st.sampled_from(range(len(TENANTS))),
        st.lists(st.integers(0, 14), min_size=1, max_size=4, unique=True),
    ),
    min_size=5,
    max_size=30,
)


def _keys_of(item: int) -> list[bytes]:
    """Items 0-9 are blocks of 1-4 layers; 10-14 are generic keys."""
    if item >= 10:
        return [b"generic-%d" % item]
    return block(item, "prop")[: 1 + item % LAYERS]


def _size_of(key: bytes) -> int:
    return 10_000 + int.from_bytes(hashlib.sha256(key).digest()[:4], "little") % 90_000


def _actual(storage: Storage) -> dict[bytes, dict[bytes, int]]:
    """group id -> {stored key: charged bytes}, read straight from the data db."""
    groups: dict[bytes, dict[bytes, int]] = defaultdict(dict)
    with storage.env.begin(db=storage.data_db) as txn:
        for key, val in txn.cursor():
            tenant = next(t for t in sorted(TENANTS, key=len, reverse=True) if key.startswith(t))
            groups[group_id(tenant, key[len(tenant):])][key] = len(key) + len(val)
    return groups


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
def test_ledger_matches_records_and_groups_go_whole(tmp_path_factory, ops):
    path = str(tmp_path_factory.mktemp("prop"))
    quota = 600_000  # three tenants together can pass the 1.2 MiB high-water mark
    storage = Storage(path, 2 * MiB, sync=False, high_water=0.6, tenant_quota=quota)
    model: dict[bytes, dict[bytes, int]] = {}
    try:
        for kind, t, items in ops:
            tenant = TENANTS[t]
            keys = [k for item in items for k in _keys_of(item)]
            if kind == "put":
                try:
                    storage.put_batch([IncomingRecord.of(k, value(k, _size_of(k))) for k in keys], tenant)
                    ok = True
                except QuotaExceeded:
                    ok = False
            elif kind == "delete":
                storage.delete(keys, tenant)
            else:
                for k in keys:
                    found = storage.get(k, tenant)
                    assert found is None or found == value(k, _size_of(k))
            actual = _actual(storage)
            if kind == "put" and ok:
                for k in keys:  # a successful put is all there
                    assert tenant + k in actual[group_id(tenant, k)]
            elif kind == "put":  # a refused put left none of its new records
                for k in keys:
                    gid = group_id(tenant, k)
                    assert (tenant + k in actual.get(gid, {})) == (tenant + k in model.get(gid, {}))
            else:
                for gid in actual:  # deletes and reads only remove (evict) records
                    assert set(actual[gid]) <= set(model.get(gid, {}))
            for gid, members in model.items():  # eviction takes a group whole or not at all
                if kind == "delete" and gid in {group_id(tenant, k) for k in keys}:
                    continue
                assert set(actual.get(gid, {})) >= set(members) or not set(actual.get(gid, {})) & set(members)
            model = {g: dict(m) for g, m in actual.items()}
            # the ledger: bytes per group and per tenant match the records exactly
            with storage.env.begin() as txn:
                lru = {bytes(g): ENTRY.unpack(v)[1] for g, v in txn.cursor(db=storage.ledger.lru)}
            assert lru == {g: sum(m.values()) for g, m in actual.items()}
            for tenant_ in TENANTS:
                charged = sum(sum(m.values()) for g, m in actual.items() if g.startswith(bytes([len(tenant_)]) + tenant_))
                assert storage.tenant_usage(tenant_) == charged <= quota
            if kind == "put" and ok:
                assert storage.used_bytes() <= 0.6 * 2 * MiB
    finally:
        storage.close()
