"""The data plane: record bytes for reads over a plain TCP socket next to gRPC, with real nodes."""

from __future__ import annotations

import os
import socket
import struct
import time

import grpc
import pytest

import kvclient.dataplane as client_dp
import kvstore.dataplane as node_dp
from kvclient import Client
from kvclient.dataplane import DataConnection
from kvclient.node import NodeConnection
from kvproto.errors import InvalidArgument, KVCacheError, Unauthenticated, Unavailable
from kvproto.limits import MAX_KEY_BYTES, MAX_KEYS_PER_CALL, MiB
from tests.test_security import TOKEN_A, TOKEN_B, _self_signed
from tests.test_store import _flip_stored_byte

SIZES = [0, 1, MiB, 3 * MiB]


def _address(node) -> str:
    return f"127.0.0.1:{node.port}"


def _client(nodes, replication: int = 1, **kw) -> Client:
    return Client([_address(n) for n in nodes], replication=replication, colocated=False, timeout=5, **kw)


def _sample(node, name: str, labels: dict | None = None, at_least: float = 0) -> float:
    """A node metric, once it reaches `at_least` (the node counts after its last byte is sent)."""
    deadline = time.monotonic() + 5
    while True:
        value = node.metrics.registry.get_sample_value(name, labels or {}) or 0
        if value >= at_least or time.monotonic() > deadline:
            return value
        time.sleep(0.005)


def _data_gets(node, at_least: float = 0) -> float:
    return _sample(node, "kvstore_requests_total", {"method": "DataGet", "code": "OK"}, at_least)


def _raw(node) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", node.data_port), timeout=5)
    sock.sendall(node_dp.HEADER.pack(node_dp.MAGIC, node_dp.HELLO, 0, node_dp.VERSION, 0))
    assert node_dp.HEADER.unpack(_read(sock, node_dp.HEADER.size))[1] == node_dp.OK
    return sock


def _read(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        try:
            part = sock.recv(n - len(out))
        except ConnectionResetError:  # closed with our unread bytes in its buffer: a reset
            break
        if not part:
            break
        out += part
    return out


def _answer(sock: socket.socket) -> tuple[int | None, int | None]:
    """(op, status code) of the node's next frame; (None, None) if it closed instead."""
    head = _read(sock, node_dp.HEADER.size)
    if len(head) < node_dp.HEADER.size:
        return None, None
    _, op, _, _, n = node_dp.HEADER.unpack(head)
    if op != node_dp.ERROR:
        return op, None
    (code,) = node_dp.CODE.unpack(_read(sock, node_dp.CODE.size))
    _read(sock, n)
    return op, code


def test_wire_format_is_defined_once():
    import kvproto.dataplane as wire

    for name in ("MAGIC", "VERSION", "HELLO", "GET", "OK", "ERROR", "FOUND", "MISSING", "CORRUPT", "HEADER", "ENTRY"):
        assert getattr(client_dp, name) is getattr(wire, name) is getattr(node_dp, name), name


def test_round_trip_and_misses_over_the_data_plane(make_node):
    node = make_node()
    assert node.data_port and node.data_port != node.port
    values = {f"k{size}".encode(): os.urandom(size) for size in SIZES}
    with _client([node]) as client:
        client.put_many(list(values.items()))
        before = _data_gets(node)
        for key, value in values.items():
            assert client.get(key) == value
        assert client.get_many([*values, b"absent"]) == [*values.values(), None]
        assert client.get(b"absent") is None
        assert _data_gets(node, before + len(values) + 2) - before == len(values) + 2
        conn = client.conn(_address(node))
        assert conn.stat(5).data_port == node.data_port
        assert len(conn._data._idle) == 1  # one connection, reused by every call
    hits = _sample(node, "kvstore_hits_total", at_least=2 * len(values))
    sent = _sample(node, "kvstore_bytes_out_total", at_least=2 * sum(SIZES))
    assert hits == 2 * len(values) and sent == 2 * sum(SIZES)


def test_damaged_records_read_as_corrupt_and_the_client_serves_the_other_replica(make_node):
    nodes = [make_node(), make_node()]
    value = os.urandom(MiB)
    with _client(nodes, replication=2, stripe=False) as client:  # reads go to replicas()[0] first
        client.put_many([(b"tail", value), (b"head", value)])
        by_address = {_address(n): n for n in nodes}
        first = {key: by_address[client.replicas(key)[0]] for key in (b"tail", b"head")}
        _flip_stored_byte(first[b"tail"], b"tail")  # payload: the client's digest check
        _flip_stored_byte(first[b"head"], b"head", offset=6)  # header flags: the node's check
        for key, node in first.items():
            conn = NodeConnection(_address(node))
            assert list(conn.get([key], 5)) == [(0, None, True)]
            conn.close()
        assert client.get_many([b"tail", b"head"]) == [value, value]
        assert client.repairs == 2


def test_auth_refuses_a_wrong_token_and_keeps_tenants_apart(make_node, tmp_path):
    from tests.test_security import TOKENS

    tokens = tmp_path / "tokens.txt"
    tokens.write_text(TOKENS)
    node = make_node(auth_tokens_file=str(tokens))
    for token in (None, "not-a-token-at-all-0123456789"):
        with pytest.raises(Unauthenticated):
            DataConnection("127.0.0.1", node.data_port, token, timeout=5)
    with _client([node], token=TOKEN_A) as a, _client([node], token=TOKEN_B) as b:
        a.put(b"secret", b"of tenant a")
        assert a.get(b"secret") == b"of tenant a"
        assert b.get(b"secret") is None
        assert b.get_many([b"secret"]) == [None]
        assert a.conn(_address(node))._data is not None and b.conn(_address(node))._data is not None
    conn = DataConnection("127.0.0.1", node.data_port, TOKEN_B, timeout=5)
    conn.request([b"secret"], time.monotonic() + 5)
    assert list(conn.entries([b"secret"], time.monotonic() + 5)) == [(0, None, False)]


def test_tls_node_serves_the_data_plane_over_tls(make_node, tmp_path):
    cert, key = _self_signed(tmp_path)
    node = make_node(tls_cert=cert, tls_key=key)
    value = os.urandom(2 * MiB)
    with Client([_address(node)], replication=1, colocated=False, tls_ca=cert, timeout=5) as client:
        client.put(b"tls", value)
        assert client.get(b"tls") == value
        assert _data_gets(node, 1) == 1
    with pytest.raises(Unavailable):  # plaintext to a TLS data plane
        conn = DataConnection("127.0.0.1", node.data_port, timeout=3)
        conn.request([b"tls"], time.monotonic() + 3)
        list(conn.entries([b"tls"], time.monotonic() + 3))


GARBAGE = [
    os.urandom(64),
    b"XXXX" + bytes(8),  # bad magic
    node_dp.HEADER.pack(node_dp.MAGIC, node_dp.GET, 0, 99, 1),  # unknown version
    node_dp.HEADER.pack(node_dp.MAGIC, 7, 0, node_dp.VERSION, 1),  # unknown op
    node_dp.HEADER.pack(node_dp.MAGIC, node_dp.GET, 0, node_dp.VERSION, 0xFFFFFFFF),  # huge key count
    node_dp.HEADER.pack(node_dp.MAGIC, node_dp.GET, 0, node_dp.VERSION, 2) + struct.pack("<2H", 9000, 9000),
    node_dp.HEADER.pack(node_dp.MAGIC, node_dp.GET, 0, node_dp.VERSION, 3) + struct.pack("<3H", 4, 4, 4) + b"abcd",
    node_dp.HEADER.pack(node_dp.MAGIC, node_dp.GET, 0, node_dp.VERSION, 1)[:7],  # truncated header
]


@pytest.mark.parametrize("garbage", GARBAGE, ids=range(len(GARBAGE)))
def test_malformed_frames_close_the_connection_and_the_node_keeps_serving(make_node, garbage):
    node = make_node()
    with _client([node]) as client:
        client.put(b"k", b"value")
        for hello in (False, True):  # before and after the HELLO
            sock = _raw(node) if hello else socket.create_connection(("127.0.0.1", node.data_port), timeout=5)
            try:
                sock.sendall(garbage)
                sock.shutdown(socket.SHUT_WR)  # a truncated frame ends here
            except OSError:  # the node has already answered and closed
                pass
            op, code = _answer(sock)
            assert op in (None, node_dp.ERROR)
            assert code in (None, grpc.StatusCode.INVALID_ARGUMENT.value[0])
            assert _read(sock, 1) == b""  # then the node closed
            sock.close()
        assert client.get(b"k") == b"value"


@pytest.mark.parametrize("bad", [b"", b"x" * (MAX_KEY_BYTES + 1)], ids=["empty", "long"])
def test_bad_keys_are_invalid_argument_and_the_connection_stays_usable(make_node, bad):
    node = make_node()
    with _client([node]) as client:
        client.put(b"k", b"value")
    conn = DataConnection("127.0.0.1", node.data_port, timeout=5)
    with pytest.raises(InvalidArgument):
        conn.request([b"k", bad], time.monotonic() + 5)
    assert conn.usable
    conn.request([b"k"], time.monotonic() + 5)
    assert [(i, bytes(v), c) for i, v, c in conn.entries([b"k"], time.monotonic() + 5)] == [(0, b"value", False)]
    with pytest.raises(InvalidArgument):
        NodeConnection(_address(node)).get([bad], 5).__next__()


def test_node_refuses_connections_beyond_its_limit(make_node):
    node = make_node()
    node.data_plane.max_connections = 2
    held = [DataConnection("127.0.0.1", node.data_port, timeout=5) for _ in range(2)]
    with pytest.raises(KVCacheError) as err:
        DataConnection("127.0.0.1", node.data_port, timeout=5)
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    held.pop().close()
    deadline = time.monotonic() + 5
    while True:  # the node notices the close on its own thread
        try:
            DataConnection("127.0.0.1", node.data_port, timeout=5).close()
            break
        except KVCacheError:
            assert time.monotonic() < deadline
            time.sleep(0.01)


def test_node_stopping_mid_read_is_unavailable_and_the_client_uses_the_other_replica(make_node, monkeypatch):
    nodes = [make_node(), make_node()]
    items = [(f"big{i}".encode(), os.urandom(3 * MiB)) for i in range(24)]  # far beyond socket buffers
    with _client(nodes, replication=2) as client:
        client.put_many(items)
        victim = nodes[0]
        conn = NodeConnection(_address(victim))
        stream = conn.get([k for k, _ in items], 10)
        assert next(stream)[1] == items[0][1]
        victim.data_plane.stop()
        with pytest.raises(Unavailable, match=_address(victim)):
            list(stream)
        conn.close()

    nodes.append(make_node())
    nodes.append(make_node())
    with _client(nodes[2:], replication=2) as client:
        client.put_many(items)
        stopped: list = []
        real_entries = client_dp.DataConnection.entries

        def stop_after_first(self, keys, deadline, reuse=False):  # one node stops while it streams
            for n, entry in enumerate(real_entries(self, keys, deadline, reuse)):
                yield entry
                if n == 0 and not stopped:
                    stopped.append(next(x for x in nodes[2:] if x.data_port == self.sock.getpeername()[1]))
                    stopped[0].stop(0)

        monkeypatch.setattr(client_dp.DataConnection, "entries", stop_after_first)
        assert client.get_many([k for k, _ in items]) == [v for _, v in items]
        assert stopped


def test_pooled_connection_to_a_restarted_node_is_replaced(make_node, tmp_path):
    data = str(tmp_path / "restart")
    node = make_node(data_dir=data)
    conn = NodeConnection(_address(node))
    with _client([node]) as client:
        client.put(b"k", b"before")
    assert [(i, bytes(v), c) for i, v, c in conn.get([b"k"], 5)] == [(0, b"before", False)]
    port, data_port = node.port, node.data_port
    node.stop(0)
    node = make_node(data_dir=data, listen=f"127.0.0.1:{port}", data_port=data_port)
    assert [(i, bytes(v), c) for i, v, c in conn.get([b"k"], 5)] == [(0, b"before", False)]
    conn.close()


def test_data_plane_off_reads_over_grpc(make_node):
    node = make_node(data_port=None)
    assert node.data_port is None and node.data_plane is None
    with _client([node]) as client:
        client.put(b"k", os.urandom(2 * MiB))
        value = client.get(b"k")
        assert value is not None and len(value) == 2 * MiB
        assert client.get(b"absent") is None
        conn = client.conn(_address(node))
        assert conn.stat(5).data_port == 0 and conn._data is None
    assert _data_gets(node) == 0


def test_unreachable_data_plane_falls_back_to_grpc(make_node):
    node = make_node()
    with _client([node]) as client:
        client.put(b"k", b"value")
        node.data_plane.stop()  # gRPC still up, the data port refuses
        assert client.get(b"k") == b"value"
        assert client.conn(_address(node))._data is None


def test_huge_key_count_is_refused_by_the_client_side_limit_too(make_node):
    node = make_node()
    conn = DataConnection("127.0.0.1", node.data_port, timeout=5)
    with pytest.raises(InvalidArgument):
        conn.request([b"k"] * (MAX_KEYS_PER_CALL + 1), time.monotonic() + 5)
