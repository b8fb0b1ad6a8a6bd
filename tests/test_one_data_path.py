"""The one data path: a one-way import graph, records bound to their keys, miss semantics that
tell a miss from an outage, a format change that never becomes a silent miss, no reruns on the
common pipelined request, and bugs that show."""

from __future__ import annotations

import ast
import logging
import os
import pathlib
import struct
import subprocess
import sys

import lmdb
import pytest
import torch
import xxhash

from inference import CachedGenerator
from kvclient import Client, Unavailable
from kvclient.node import NodeConnection
from tests.conftest_models import BLOCK, local_store, plain_tokens, prompt, tiny  # noqa: F401  (fixture)

REPO = pathlib.Path(__file__).resolve().parent.parent


# ---- the import graph ------------------------------------------------------------------------
def _imports(package: str) -> set[str]:
    """Top-level packages imported anywhere in `package` (function bodies included)."""
    found: set[str] = set()
    for path in (REPO / package).rglob("*.py"):
        if "_pb" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return found


def test_imports_run_one_way() -> None:
    """kvproto at the bottom; node and client import it and not each other; inference and bench on top."""
    assert not _imports("kvproto") & {"kvstore", "kvclient", "inference", "bench"}
    assert not _imports("kvclient") & {"kvstore", "inference", "bench"}
    assert not _imports("kvstore") & {"kvclient", "inference", "bench"}
    assert "kvproto" in _imports("kvstore") and "kvproto" in _imports("kvclient")


# ---- records are bound to their keys ---------------------------------------------------------
def test_another_keys_intact_bytes_read_as_corrupt_and_are_repaired(make_node) -> None:
    """A damaged overflow pointer can land key A's lookup on key B's pages (DESIGN §9)."""
    nodes = [make_node() for _ in range(2)]
    addrs = [f"127.0.0.1:{n.port}" for n in nodes]
    a, b = b"key-a" + bytes(8), b"key-b" + bytes(8)
    with Client(addrs, replication=2) as client:
        client.put_many([(a, b"A's bytes" * 1000), (b, b"B's bytes" * 1000)])
        primary = nodes[addrs.index(client.replicas(a)[0])]
        storage = primary.storage

        def land_on_b() -> None:
            with storage.env.begin(db=storage.data_db, write=True) as txn:
                txn.put(a, bytes(txn.get(b)))  # B's record, intact, under A

        land_on_b()
        conn = NodeConnection(f"127.0.0.1:{primary.port}")
        assert list(conn.get([a], 5)) == [(0, None, True)]  # corrupt, not B's bytes as FOUND
        reply = conn.put([(a, b"A's bytes" * 1000)], 5)  # a repair put replaces it
        assert (reply.stored, reply.existed) == (1, 0)
        assert list(conn.get([a], 5)) == [(0, b"A's bytes" * 1000, False)]
        land_on_b()
        assert client.get(a) == b"A's bytes" * 1000  # served by the other replica
        conn.close()


# ---- miss semantics --------------------------------------------------------------------------
def test_a_live_replicas_missing_is_a_miss_not_an_outage(make_node) -> None:
    nodes = [make_node() for _ in range(2)]
    addrs = [f"127.0.0.1:{n.port}" for n in nodes]
    with Client(addrs, replication=2, timeout=2, stream_timeout=2) as client:
        client.put(b"written" + bytes(8), b"here")
        nodes[0].stop(0)
        assert client.get(b"never-written" + bytes(8)) is None
        assert client.exists([b"never-written" + bytes(8)]) == [False]
        assert client.get(b"written" + bytes(8)) == b"here"
        nodes[1].stop(0)
        with pytest.raises(Unavailable) as err:
            client.get(b"never-written" + bytes(8))
        assert err.value.__cause__ is not None  # the node's own error is kept
        with pytest.raises(Unavailable):
            client.exists([b"never-written" + bytes(8)])


def test_read_into_streams_records_and_still_repairs(make_node) -> None:
    """read_into over the network hands each record to the sink as it arrives (a reused receive
    buffer); a replica that lacked one still gets it written back."""
    nodes = [make_node() for _ in range(2)]
    addrs = [f"127.0.0.1:{n.port}" for n in nodes]
    keys = [b"stream-%d" % i + bytes(8) for i in range(6)]
    values = [bytes([i]) * (300_000 + i) for i in range(6)]
    with Client(addrs, replication=2, stripe=False) as client:
        client.put_many(list(zip(keys, values)))
        primary = client.replicas(keys[2])[0]
        NodeConnection(primary).delete([keys[2]], 5)
        seen: dict[int, bytes] = {}
        found = client.read_into(keys + [b"absent" + bytes(8)],
                                 lambda batch: seen.update((i, bytes(v)) for i, v, _ in batch))
        assert found == [True] * 6 + [False]
        assert seen == dict(enumerate(values))
        client.flush()
        assert list(NodeConnection(primary).get([keys[2]], 5)) == [(0, values[2], False)]


@pytest.mark.parametrize("quorum", [1, 2])
def test_delete_follows_the_write_quorum(make_node, quorum: int) -> None:
    nodes = [make_node() for _ in range(2)]
    addrs = [f"127.0.0.1:{n.port}" for n in nodes]
    key = b"delete-me" + bytes(8)
    with Client(addrs, replication=2, timeout=2, write_quorum=quorum) as client:
        client.put(key, b"v")
        nodes[1].stop(0)
        if quorum == 1:
            assert client.delete([key]) == 1
        else:
            with pytest.raises(Unavailable, match="below write quorum") as err:
                client.delete([key])
            assert err.value.__cause__ is not None
            with pytest.raises(Unavailable, match="below write quorum"):
                client.put(b"other" + bytes(8), b"v")


# ---- a format change is never a silent miss --------------------------------------------------
def _write_format1_node(path: str, items: list[tuple[bytes, bytes]]) -> None:
    header = struct.Struct("<4sHHQ16s")
    os.makedirs(path)
    env = lmdb.open(path, max_dbs=8, map_size=1 << 26)
    data = env.open_db(b"data")
    with env.begin(db=data, write=True) as txn:
        for key, value in items:
            txn.put(key, header.pack(b"KVR1", 1, 0, len(value), xxhash.xxh3_128_digest(value)) + value)
    env.close()


def _kvstore(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvstore.cli", *args], capture_output=True, text=True,
                          timeout=60, cwd=REPO)


def test_format1_files_are_refused_then_migrated(tmp_path, spawn_node) -> None:
    items = [(f"old-{i}".encode() + bytes(8), os.urandom(100 + i)) for i in range(20)]
    data = tmp_path / "old"
    _write_format1_node(str(data), items)
    refused = _kvstore("serve", "--listen", "127.0.0.1:0", "--data", str(data), "--no-sync")
    assert refused.returncode == 2
    [line] = refused.stderr.strip().splitlines()
    assert "format 1" in line and f"kvstore migrate --data {data}" in line
    migrated = _kvstore("migrate", "--data", str(data))
    assert migrated.returncode == 0 and "20 records converted" in migrated.stdout
    node = spawn_node("old")
    with Client([node.address], replication=1, colocated=False) as client:
        assert client.get_many([k for k, _ in items]) == [v for _, v in items]
    missing = _kvstore("migrate", "--data", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "nowhere" in missing.stderr and "Traceback" not in missing.stderr


# ---- no rerun on the common request ----------------------------------------------------------
def test_new_questions_about_a_cached_document_never_rerun(local_store) -> None:
    """The tail's presence comes from the same batched lookup as the blocks: a pipelined forward
    starts only on records that exist, so a new question (absent tail) never aborts it."""
    model = tiny("tiny-qwen3")
    document = prompt(3 * BLOCK, seed=21)
    with CachedGenerator(model, local_store, block_size=BLOCK) as writer:
        writer.generate(document, 1, do_sample=False)
        writer.flush()
    gen = CachedGenerator(model, local_store, block_size=BLOCK, publish=False, pipeline_loads=True)
    for n in range(10):
        ids = torch.cat([document, prompt(5 + n, seed=100 + n)], dim=1)
        result = gen.generate(ids, 4, do_sample=False)
        assert result.cached_tokens == 3 * BLOCK
        assert torch.equal(result.sequences, plain_tokens(model, ids, 4))
    assert gen.stats["load_reruns"] == 0 and gen.stats["requests"] == 10


# ---- bugs show ------------------------------------------------------------------------------
class BuggyStore:
    """A real store whose read path has a bug (not a store error)."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def read_into(self, keys, sink, verify=True):
        raise AttributeError("simulated bug in the loader's store")

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.mark.parametrize("pipelined", [False, True], ids=["sync", "pipelined"])
def test_a_bug_in_the_load_raises_in_tests_and_is_counted_in_production(local_store, caplog, pipelined) -> None:
    model = tiny("tiny-qwen3")
    ids = prompt(2 * BLOCK + 3, seed=22)
    with CachedGenerator(model, local_store, block_size=BLOCK) as writer:
        writer.generate(ids, 1, do_sample=False)
    strict = CachedGenerator(model, BuggyStore(local_store), block_size=BLOCK, publish=False,
                             pipeline_loads=pipelined, internal_errors="raise")
    with pytest.raises(AttributeError, match="simulated bug"):
        strict.generate(ids, 4, do_sample=False)
    counted = CachedGenerator(model, BuggyStore(local_store), block_size=BLOCK, publish=False,
                              pipeline_loads=pipelined, internal_errors="count")
    with caplog.at_level(logging.ERROR, logger="inference.generator"):
        result = counted.generate(ids, 4, do_sample=False)
    assert torch.equal(result.sequences, plain_tokens(model, ids, 4))
    assert result.cached_tokens == 0 and result.miss_reasons == {"internal_error": 1}
    assert counted.stats["internal_error"] == 1
    assert any(r.exc_info and "simulated bug" in str(r.exc_info[1]) for r in caplog.records)
