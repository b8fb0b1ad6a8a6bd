"""One contract suite for every Store (kvproto.store): the in-process store, the gRPC client and
the co-located path each pass the same tests (zarr-python's StoreTests, in pytest's terms)."""

from __future__ import annotations

import os

import pytest


from kvproto import record
from kvproto.store import Store
from kvclient import Client
from kvstore.config import ServerConfig
from kvstore.server import create_server
from tests.conftest import wait_healthy
from tests.conftest_models import colocated_store, grpc_store, local_store  # noqa: F401  (fixtures)

MiB = 1 << 20


@pytest.fixture
def grpc_only_store(tmp_path):
    """A node without a data plane: reads stay on gRPC."""
    server, port = create_server(ServerConfig(listen="127.0.0.1:0", data_dir=str(tmp_path / "grpc-only"), sync=False,
                                              map_size_gb=1.0, data_port=None))
    wait_healthy(f"127.0.0.1:{port}")
    client = Client([f"127.0.0.1:{port}"], replication=1)
    yield client
    client.close()
    server.node.stop(0)


@pytest.fixture(params=["local", "grpc", "grpc_only", "colocated"],
                ids=["in-process", "remote-data-plane", "remote-grpc-only", "colocated"])
def store(request):
    """Every Store this project has: the same tests, each implementation."""
    return request.getfixturevalue(f"{request.param}_store")


def _value(i: int, size: int = 1000) -> bytes:
    return (i.to_bytes(4, "little") + os.urandom(12)) * (size // 16) + b"x" * (size % 16)


def test_is_a_store(store) -> None:
    assert isinstance(store, Store)


def test_put_then_get_many_in_key_order(store) -> None:
    items = [(f"contract-{i}".encode(), _value(i, size)) for i, size in enumerate([0, 1, 4096, 3 * MiB + 7])]
    store.put_many(items)
    keys = [k for k, _ in items]
    assert store.get_many(keys[::-1] + [b"never-written"]) == [v for _, v in items][::-1] + [None]


def test_exists_and_lookup_give_the_stored_prefix(store) -> None:
    keys = [f"prefix-{i}".encode() for i in range(5)]
    store.put_many([(k, b"v") for k in keys[:2] + keys[3:]])
    assert store.exists(keys) == [True, True, False, True, True]
    assert store.lookup(keys) == 2
    assert store.lookup([]) == 0


def test_read_into_hands_views_with_their_digest_to_check(store) -> None:
    items = [(f"into-{i}".encode(), _value(i, 64 * 1024)) for i in range(6)]
    store.put_many(items)
    keys = [k for k, _ in items] + [b"absent"]
    for verify in (True, False):
        seen: dict[int, bytes] = {}

        def sink(batch) -> None:
            for i, view, digest in batch:
                if digest is not None:  # the store left the check to us: it must pass
                    record.check(keys[i], view, digest)
                seen[i] = bytes(view)  # views die when the sink returns

        found = store.read_into(keys, sink, verify=verify)
        assert found == [True] * 6 + [False]
        assert seen == {i: v for i, (_, v) in enumerate(items)}


def test_first_writer_wins(store) -> None:
    store.put_many([(b"once", b"first")])
    store.put_many([(b"once", b"second")])
    assert store.get_many([b"once"]) == [b"first"]


def test_delete_counts_and_removes(store) -> None:
    store.put_many([(b"gone-1", b"a"), (b"gone-2", b"b"), (b"kept", b"c")])
    assert store.delete([b"gone-1", b"gone-2", b"never"]) == 2
    assert store.get_many([b"gone-1", b"gone-2", b"kept"]) == [None, None, b"c"]
    assert store.exists([b"gone-1"]) == [False]
