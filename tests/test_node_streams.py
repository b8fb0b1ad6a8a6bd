"""Slow clients cannot starve a node: stream caps, idle timeouts, bounded replies, spooled puts."""

from __future__ import annotations

import os
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvclient.node import Credentials, NodeConnection
from kvproto import record
from kvproto.errors import QuotaExceeded
from kvproto.framing import put_messages
from kvproto.pb import SERVICE_NAME, kvcache_pb2 as pb

TOKEN_A = "token-of-the-hog-0123456789abcdef"
TOKEN_B = "token-of-a-bystander-0123456789ab"
MiB = 1 << 20


@pytest.fixture
def tokens_file(tmp_path):
    path = tmp_path / "tokens.txt"
    path.write_text(f"{TOKEN_A} hog\n{TOKEN_B} bystander\n")
    return str(path)


def _stalled_put(channel: grpc.Channel, token: str | None, release: threading.Event, send_bytes: int = 1024):
    """A Put stream that sends `send_bytes` of a record claiming 200 MiB, then waits."""
    key = bytes(34)
    digest = record.digest(key, b"")

    def requests():
        head = pb.PutRequest(key=key, size=200 * MiB, checksum=digest)
        yield head.SerializeToString()
        sent = 0
        while sent < send_bytes:
            n = min(MiB, send_bytes - sent)
            yield pb.PutRequest(data=os.urandom(16) * (n // 16)).SerializeToString()
            sent += n
        release.wait(60)

    metadata = (("authorization", f"Bearer {token}"),) if token else None
    put = channel.stream_unary(f"/{SERVICE_NAME}/Put", None, pb.PutResponse.FromString)
    return put.future(requests(), metadata=metadata, timeout=90)


def _unread_get(channel: grpc.Channel, token: str, key: bytes):
    metadata = (("authorization", f"Bearer {token}"),)
    get = channel.unary_stream(f"/{SERVICE_NAME}/Get", lambda m: m.SerializeToString(), pb.GetResponse.FromString)
    return get(pb.GetRequest(keys=[key] * 8), metadata=metadata, timeout=90)  # never iterated


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def test_idle_streams_of_one_tenant_cannot_starve_another(make_node, tokens_file):
    node = make_node(auth_tokens_file=tokens_file, stream_idle_seconds=3.0, data_port=None)
    address = f"127.0.0.1:{node.port}"
    hog = NodeConnection(address, Credentials(TOKEN_A))
    bystander = NodeConnection(address, Credentials(TOKEN_B))
    big = os.urandom(4 * MiB)
    hog.put([(b"h" * 34, big)], timeout=30)
    small = os.urandom(MiB)
    bystander.put([(b"b" * 34, small)], timeout=30)

    release = threading.Event()
    channels = [grpc.insecure_channel(address) for _ in range(4)]
    puts = [_stalled_put(channels[i % 4], TOKEN_A, release) for i in range(32)]
    gets = [_unread_get(channels[i % 4], TOKEN_A, b"h" * 34) for i in range(16)]
    try:
        deadline = time.monotonic() + 10
        while node.servicer.streams.open_streams() < 8 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert node.servicer.streams.open_streams() == 8  # the tenant's cap, the rest refused
        health = health_pb2_grpc.HealthStub(bystander.channel)
        assert _timed(lambda: health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)) < 1
        stat = bystander.stat(1.0)
        assert stat.tenant_scoped and stat.records == 1
        fetched = {}
        elapsed = _timed(lambda: fetched.update({i: v for i, v, _ in bystander.get([b"b" * 34], 1.0)}))
        assert elapsed < 1 and fetched[0] == small
        refused = [f for f in puts if f.done() and f.exception() is not None]
        assert refused and all(f.exception().code() == grpc.StatusCode.RESOURCE_EXHAUSTED for f in refused)
        # the watchdog ends the idle ones: their slots come back
        deadline = time.monotonic() + 10
        while node.servicer.streams.open_streams() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert node.servicer.streams.open_streams() == 0
        assert node.servicer.streams.timed_out >= 8
        hog.put([(b"x" * 34, b"after")], timeout=5)  # the hog itself is served again
    finally:
        release.set()
        for call in gets:
            call.cancel()
        for ch in channels:
            ch.close()
        hog.close()
        bystander.close()


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def test_unfinished_puts_are_spooled_not_held_in_memory(spawn_node):
    """32 unfinished puts of 48 MiB each (1.5 GiB in flight): the node grows by far less, since a
    stream keeps at most 8 MiB in memory and spools the rest to a file in its data directory."""
    node = spawn_node(extra=["--stream-idle-seconds", "60"])
    before = _rss(node.proc.pid)
    release = threading.Event()
    channels = [grpc.insecure_channel(node.address) for _ in range(4)]
    puts = [_stalled_put(channels[i % 4], None, release, send_bytes=48 * MiB) for i in range(32)]
    try:
        time.sleep(1.0)
        deadline = time.monotonic() + 60
        peak = before
        while time.monotonic() < deadline:
            peak = max(peak, _rss(node.proc.pid))
            if all(not f.done() for f in puts) and _spool_bytes(node.proc.pid) >= 32 * 40 * MiB:
                break
            time.sleep(0.2)
        assert _spool_bytes(node.proc.pid) >= 32 * 40 * MiB, "the puts did not arrive"
        peak = max(peak, _rss(node.proc.pid))
        print(f"node grew by {(peak - before) / MiB:.0f} MiB with {_spool_bytes(node.proc.pid) / MiB:.0f} MiB spooled")
        assert peak - before < 600 * MiB, f"node grew by {(peak - before) / MiB:.0f} MiB"
    finally:
        release.set()
        for ch in channels:
            ch.close()
    conn = NodeConnection(node.address)
    try:
        assert conn.lookup([bytes(34)], 5.0) == [False]  # nothing of the unfinished puts was stored
    finally:
        conn.close()


def _spool_bytes(pid: int) -> int:
    """Bytes in the node's spool files (unlinked temporary files it holds open)."""
    total = 0
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(os.path.join(fd_dir, fd))
            if target.endswith("(deleted)"):
                total += os.stat(os.path.join(fd_dir, fd)).st_size
        except OSError:
            continue
    return total


def test_a_get_reply_is_bounded_per_call(make_node):
    node = make_node(max_get_bytes=10 * MiB)
    conn = NodeConnection(f"127.0.0.1:{node.port}")
    try:
        conn.put([(b"k" * 34, os.urandom(4 * MiB))], timeout=30)
        assert [v is not None for _, v, _ in conn.get([b"k" * 34] * 2, 10.0)] == [True, True]
        with pytest.raises(QuotaExceeded, match="ask for fewer keys"):
            list(conn.get([b"k" * 34] * 3, 10.0))  # 12 MiB > 10 MiB (over gRPC or the data plane)
    finally:
        conn.close()


def test_a_spooled_put_is_all_or_nothing(make_node):
    """A put larger than the in-memory spool lands whole; one broken off mid-record stores nothing."""
    node = make_node()
    conn = NodeConnection(f"127.0.0.1:{node.port}")
    try:
        items = [(bytes([i]) * 34, os.urandom(5 * MiB)) for i in range(4)]  # 20 MiB: spilled to a file
        conn.put(items, timeout=30)
        assert [v for _, v, _ in conn.get([k for k, _ in items], 10.0)] == [v for _, v in items]
        key, value = b"z" * 34, os.urandom(12 * MiB)
        msgs = list(put_messages(key, value, record.digest(key, value)))
        put = conn.channel.stream_unary(f"/{SERVICE_NAME}/Put", None, pb.PutResponse.FromString)
        with pytest.raises(grpc.RpcError) as err:
            put(iter(msgs[:-1]), timeout=10)  # the last chunk never comes
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert conn.lookup([key], 5.0) == [False]
    finally:
        conn.close()
