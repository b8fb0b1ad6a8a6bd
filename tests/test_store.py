"""A node and the client over real gRPC on loopback: round trips, bad input, limits, metrics."""

from __future__ import annotations

import os
import urllib.request

import grpc
import pytest

from kvclient import Client, InvalidArgument, QuotaExceeded
from kvproto import record
from kvclient.node import NodeConnection
from kvproto.pb import SERVICE_NAME, kvcache_pb2 as pb

MiB = 1 << 20


@pytest.fixture
def one(make_node):
    node = make_node()
    with Client([f"127.0.0.1:{node.port}"], replication=1) as client:
        yield node, client


@pytest.mark.parametrize("size", [0, 1, 1000, MiB - 1, MiB, MiB + 1, 5 * MiB + 3, 64 * MiB])
def test_round_trip_sizes(one, size):
    _, client = one
    value = os.urandom(size)
    key = f"size-{size}".encode()
    client.put(key, value)
    assert client.get(key) == value


def test_miss_is_an_answer_not_an_error(one):
    _, client = one
    assert client.get(b"absent") is None
    assert client.get_many([b"absent", b"also"]) == [None, None]
    assert client.lookup([b"absent"]) == 0


def test_batches_lookup_and_first_writer_wins(one):
    node, client = one
    client.put_many([(b"a", b"1"), (b"b", b"2"), (b"c", b"3")])
    assert client.get_many([b"c", b"x", b"a"]) == [b"3", None, b"1"]
    assert client.lookup([b"a", b"b", b"x", b"c"]) == 2
    assert client.exists([b"a", b"x"]) == [True, False]
    reply = NodeConnection(f"127.0.0.1:{node.port}").put([(b"a", b"other")], 5)
    assert (reply.stored, reply.existed) == (0, 1)
    assert client.get(b"a") == b"1"
    assert client.delete([b"a", b"x"]) == 1 and client.get(b"a") is None


def _raw(node, method: str, stream: bool = False):
    channel = grpc.insecure_channel(f"127.0.0.1:{node.port}")
    path = f"/{SERVICE_NAME}/{method}"
    if stream:
        return channel.stream_unary(path)
    return channel.unary_unary(path)


@pytest.mark.parametrize("method", ["Lookup", "Delete", "Stat", "LocalInfo"])
def test_garbage_bytes_are_invalid_argument(make_node, method):
    node = make_node()
    with pytest.raises(grpc.RpcError) as err:
        _raw(node, method)(b"\xff\xff\xff\x07garbage", timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_garbage_get_and_put(make_node):
    node = make_node()
    channel = grpc.insecure_channel(f"127.0.0.1:{node.port}")
    with pytest.raises(grpc.RpcError) as err:
        list(channel.unary_stream(f"/{SERVICE_NAME}/Get")(b"\x0a\xff\xff", timeout=5))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        channel.stream_unary(f"/{SERVICE_NAME}/Put")(iter([b"\x0a\x05ab"]), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("key", [b"", b"k" * 257])
def test_bad_keys(one, key):
    _, client = one
    with pytest.raises(InvalidArgument):
        client.put(key, b"v")
    with pytest.raises(InvalidArgument):
        client.lookup([key])


def _put_stream(node, messages):
    channel = grpc.insecure_channel(f"127.0.0.1:{node.port}")
    put = channel.stream_unary(f"/{SERVICE_NAME}/Put", lambda m: m.SerializeToString(), pb.PutResponse.FromString)
    return put(iter(messages), timeout=5)


@pytest.mark.parametrize(
    "messages, code",
    [
        ([pb.PutRequest(key=b"k", size=4, checksum=b"short", data=b"abcd")], grpc.StatusCode.INVALID_ARGUMENT),
        ([pb.PutRequest(key=b"k", size=2, checksum=record.digest(b"k", b"ab"), data=b"abc")], grpc.StatusCode.INVALID_ARGUMENT),
        ([pb.PutRequest(key=b"k", size=4, checksum=record.digest(b"k", b"abcd"), data=b"ab")], grpc.StatusCode.INVALID_ARGUMENT),
        ([pb.PutRequest(key=b"k", size=4, checksum=record.digest(b"k", b"abcd"), data=b"abce")], grpc.StatusCode.DATA_LOSS),
    ],
    ids=["bad-checksum-length", "too-much-data", "stream-ends-inside-record", "flipped-in-transit"],
)
def test_malformed_put_streams_store_nothing(make_node, messages, code):
    node = make_node()
    good = pb.PutRequest(key=b"good", size=1, checksum=record.digest(b"good", b"g"), data=b"g")
    with pytest.raises(grpc.RpcError) as err:
        _put_stream(node, [good, *messages])
    assert err.value.code() == code
    assert node.storage.exists([b"good", b"k"]) == [False, False]


def test_cancelled_put_leaves_nothing(make_node):
    node = make_node()
    sent = []

    def messages():
        payload = os.urandom(4 * MiB)
        yield pb.PutRequest(key=b"first", size=1, checksum=record.digest(b"first", b"x"), data=b"x")
        yield pb.PutRequest(key=b"big", size=len(payload), checksum=record.digest(b"big", payload), data=payload[:MiB])
        sent.append(1)
        raise RuntimeError("client dies mid-stream")

    channel = grpc.insecure_channel(f"127.0.0.1:{node.port}")
    put = channel.stream_unary(f"/{SERVICE_NAME}/Put", lambda m: m.SerializeToString(), pb.PutResponse.FromString)
    with pytest.raises(grpc.RpcError):
        put(messages(), timeout=5)
    assert sent and node.storage.exists([b"first", b"big"]) == [False, False]


def test_record_over_limit_is_resource_exhausted(make_node):
    node = make_node(max_record_bytes=MiB)
    with Client([f"127.0.0.1:{node.port}"], replication=1) as client:
        with pytest.raises(QuotaExceeded):
            client.put(b"big", os.urandom(MiB + 1))
        client.put(b"fits", os.urandom(MiB))


def test_full_store_refuses_writes_and_keeps_serving_reads(make_node):
    node = make_node(map_size_gb=16 / 1024, high_water=1.0)  # 16 MiB map, eviction off
    with Client([f"127.0.0.1:{node.port}"], replication=1) as client:
        client.put(b"kept", b"still here")
        with pytest.raises(QuotaExceeded):
            for i in range(10):
                client.put(f"fill-{i}".encode(), os.urandom(4 * MiB))
        assert client.get(b"kept") == b"still here"
        assert client.stat()[f"127.0.0.1:{node.port}"]["records"] >= 1


def test_corrupt_on_disk_reads_as_corrupt_state(make_node):
    node = make_node()
    conn = NodeConnection(f"127.0.0.1:{node.port}")
    conn.put([(b"rec", b"payload-bytes")], 5)
    _flip_stored_byte(node, b"rec")
    [(index, value, corrupt)] = list(conn.get([b"rec"], 5))
    assert (index, value, corrupt) == (0, None, True)


def _flip_stored_byte(node, key: bytes, offset: int = -1) -> None:
    storage = node.storage
    with storage.env.begin(db=storage.data_db, write=True) as txn:
        value = bytearray(txn.get(key))
        value[offset] ^= 0x01
        txn.put(key, bytes(value))


def test_metrics_endpoint(make_node):
    node = make_node(metrics_port=0)
    with Client([f"127.0.0.1:{node.port}"], replication=1) as client:
        client.put(b"m", b"12345")
        client.get(b"m")
        client.get(b"absent")
    text = urllib.request.urlopen(f"http://127.0.0.1:{node.metrics_port}/metrics", timeout=5).read().decode()
    assert 'kvstore_requests_total{code="OK",method="Put"} 1.0' in text
    assert "kvstore_hits_total 1.0" in text
    assert 'kvstore_misses_total{reason="missing"}' in text
    assert "kvstore_bytes_in_total 5.0" in text
    assert "kvstore_lmdb_used_bytes" in text and "kvstore_request_seconds_bucket" in text
