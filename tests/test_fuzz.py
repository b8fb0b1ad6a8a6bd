"""Fuzzing every RPC of a real node: random bytes, random protobufs, random Put streams, bit flips
in transit. The node must answer each with a proper status (never UNKNOWN or INTERNAL), store
nothing from a broken stream, and stay healthy."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor as FD
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings, strategies as st

from kvclient import Client
from kvproto import record
from kvproto.pb import SERVICE_NAME, kvcache_pb2 as pb
from kvstore.config import ServerConfig
from kvstore.server import build_node

MiB = 1 << 20
FORBIDDEN = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
REQUESTS = {
    "Put": pb.PutRequest,
    "Get": pb.GetRequest,
    "Lookup": pb.LookupRequest,
    "Delete": pb.DeleteRequest,
    "Stat": pb.StatRequest,
    "Scan": pb.ScanRequest,
    "LocalInfo": pb.LocalInfoRequest,
}
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
TOKEN = "fuzz-token-0123456789abcdef"


@pytest.fixture(scope="module")
def fuzz_node(tmp_path_factory):
    """One node for the whole module (fuzz examples share it, as real traffic would)."""
    root = tmp_path_factory.mktemp("fuzz")
    tokens = root / "tokens"
    tokens.write_text(f"{TOKEN} fuzzers\n")
    nodes = {
        "open": build_node(ServerConfig(data_dir=str(root / "open"), sync=False, map_size_gb=0.25, high_water=0.9)),
        "auth": build_node(ServerConfig(data_dir=str(root / "auth"), sync=False, map_size_gb=0.25,
                                        auth_tokens_file=str(tokens))),
    }
    channels = {name: grpc.insecure_channel(f"127.0.0.1:{n.port}") for name, n in nodes.items()}
    yield nodes, channels
    for name, node in nodes.items():
        channels[name].close()
        node.stop(0)


def call(channel: grpc.Channel, method: str, payload, metadata=None) -> grpc.StatusCode:
    """Send raw bytes (a list of them for Put) and return the status code."""
    path = f"/{SERVICE_NAME}/{method}"
    try:
        if method == "Put":
            channel.stream_unary(path)(iter(payload), timeout=10, metadata=metadata)
        elif method == "Get":
            list(channel.unary_stream(path)(payload, timeout=10, metadata=metadata))
        else:
            channel.unary_unary(path)(payload, timeout=10, metadata=metadata)
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def check(code: grpc.StatusCode, what) -> None:
    assert code not in FORBIDDEN, f"{code.name} for {what!r}"[:500]


# ---- strategies: any message of the API, field by field from its descriptor ------------------
KEYS = st.one_of(
    st.binary(max_size=40), st.binary(min_size=34, max_size=34), st.binary(min_size=250, max_size=300)
)
SCALARS = {
    FD.TYPE_BYTES: KEYS,
    FD.TYPE_STRING: st.text(max_size=40),
    FD.TYPE_BOOL: st.booleans(),
    FD.TYPE_UINT32: st.one_of(st.integers(0, 8), st.integers(0, 2**32 - 1)),
    FD.TYPE_UINT64: st.one_of(st.integers(0, 1 << 21), st.integers(0, 2**64 - 1)),
    FD.TYPE_ENUM: st.integers(0, 3),
}


def messages(cls) -> st.SearchStrategy:
    fields = {}
    for f in cls.DESCRIPTOR.fields:
        value = SCALARS[f.type]
        is_repeated = getattr(f, "is_repeated", None)
        repeated = is_repeated if isinstance(is_repeated, bool) else f.label == FD.LABEL_REPEATED
        fields[f.name] = st.lists(value, max_size=30) if repeated else value
    return st.fixed_dictionaries({}, optional=fields).map(lambda kw: cls(**kw))


@pytest.mark.parametrize("method", list(REQUESTS))
@FUZZ
@given(data=st.data())
def test_random_bytes_into_every_rpc(fuzz_node, method, data):
    _, channels = fuzz_node
    raw = data.draw(st.binary(max_size=2048))
    payload = data.draw(st.lists(st.binary(max_size=512), max_size=6)) if method == "Put" else raw
    check(call(channels["open"], method, payload), payload)


@pytest.mark.parametrize("which", ["open", "auth"])
@pytest.mark.parametrize("method", list(REQUESTS))
@FUZZ
@given(data=st.data())
def test_random_protobufs_into_every_rpc(fuzz_node, method, which, data):
    """Also as an authenticated tenant: its keys get a 16-byte prefix (272 bytes at most)."""
    _, channels = fuzz_node
    cls = REQUESTS[method]
    metadata = (("authorization", f"Bearer {TOKEN}"),) if which == "auth" else None
    if method == "Put":
        parts = st.one_of(messages(cls).map(lambda m: m.SerializeToString()), st.binary(max_size=64))
        payload = data.draw(st.lists(parts, max_size=8))
    else:
        payload = data.draw(messages(cls)).SerializeToString()
    check(call(channels[which], method, payload, metadata), payload)


@st.composite
def put_streams(draw) -> tuple[list[bytes], set[bytes], bool]:
    """Well-formed and nearly well-formed Put streams: (messages, keys, clean?)."""
    out: list[bytes] = []
    keys: set[bytes] = set()
    clean = True
    for _ in range(draw(st.integers(1, 4))):
        key = draw(st.binary(min_size=1, max_size=40))
        payload = draw(st.binary(max_size=3000))
        digest = record.digest(key, payload)
        size = len(payload)
        fault = draw(st.sampled_from(["none", "none", "flip", "short", "long", "zero-size", "checksum"]))
        if fault == "flip" and payload:
            at = draw(st.integers(0, len(payload) * 8 - 1))
            payload = bytearray(payload)
            payload[at // 8] ^= 1 << (at % 8)
            payload = bytes(payload)
        elif fault == "short" and payload:
            payload = payload[:-1]
        elif fault == "long":
            payload += b"\x00"
        elif fault == "zero-size":
            size = 0
        elif fault == "checksum":
            digest = digest[:-1] + bytes([digest[-1] ^ 0x80])
        clean = clean and (fault == "none" or (fault in ("flip", "short") and not payload)
                           or (fault == "zero-size" and not payload))
        keys.add(key)
        cut = draw(st.integers(0, len(payload)))
        out.append(pb.PutRequest(key=key, size=size, checksum=digest, data=payload[:cut]).SerializeToString())
        if payload[cut:]:
            out.append(pb.PutRequest(data=payload[cut:]).SerializeToString())
    return out, keys, clean


@FUZZ
@given(stream=put_streams())
def test_put_streams_store_all_or_nothing(fuzz_node, stream):
    nodes, channels = fuzz_node
    messages_, keys, clean = stream
    storage = nodes["open"].storage
    storage.delete(list(keys))
    code = call(channels["open"], "Put", messages_)
    check(code, messages_)
    if not clean:  # a flipped bit, a wrong size or checksum anywhere: nothing of the stream stays
        assert code in {grpc.StatusCode.DATA_LOSS, grpc.StatusCode.INVALID_ARGUMENT}, code
        assert storage.exists(sorted(keys)) == [False] * len(keys)
    elif code == grpc.StatusCode.OK:
        assert storage.exists(sorted(keys)) == [True] * len(keys)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_every_bit_flip_in_transit_is_data_loss(fuzz_node, data):
    """A record over several chunks with one bit flipped in its data or its checksum."""
    nodes, channels = fuzz_node
    size = data.draw(st.one_of(st.integers(1, 4096), st.integers(MiB - 2, MiB + 2), st.integers(MiB, 2 * MiB + 10)))
    payload = bytearray(data.draw(st.binary(min_size=64, max_size=64)) * (size // 64 + 1))[:size]
    key = b"flip-%d" % size
    digest = bytearray(record.digest(key, bytes(payload)))
    where = data.draw(st.sampled_from(["data", "checksum"]))
    target = payload if where == "data" else digest
    bit = data.draw(st.integers(0, len(target) * 8 - 1))
    target[bit // 8] ^= 1 << (bit % 8)
    good = pb.PutRequest(key=b"innocent", size=1, checksum=record.digest(b"innocent", b"i"), data=b"i")
    msgs = [good.SerializeToString(),
            pb.PutRequest(key=key, size=size, checksum=bytes(digest), data=bytes(payload[:MiB])).SerializeToString()]
    msgs += [pb.PutRequest(data=bytes(payload[i : i + MiB])).SerializeToString() for i in range(MiB, size, MiB)]
    nodes["open"].storage.delete([b"innocent"])
    assert call(channels["open"], "Put", msgs) == grpc.StatusCode.DATA_LOSS
    assert nodes["open"].storage.exists([b"innocent", key]) == [False, False]


@FUZZ
@given(value=st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=60),
       method=st.sampled_from(list(REQUESTS)))
def test_random_authorization_headers_are_unauthenticated(fuzz_node, value, method):
    _, channels = fuzz_node
    payload = [b""] if method == "Put" else b""
    code = call(channels["auth"], method, payload, metadata=(("authorization", value),))
    assert code == grpc.StatusCode.UNAUTHENTICATED, (value, code)


def test_node_still_healthy_and_never_answered_internal(fuzz_node):
    nodes, channels = fuzz_node
    for name, node in nodes.items():
        reply = health_pb2_grpc.HealthStub(channels[name]).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        token = TOKEN if name == "auth" else None
        with Client([f"127.0.0.1:{node.port}"], replication=1, token=token) as client:
            client.put(b"after-the-fuzz", b"still works" * 1000)
            assert client.get(b"after-the-fuzz") == b"still works" * 1000
        answered = {
            (s.labels["method"], s.labels["code"]): s.value
            for metric in node.metrics.registry.collect()
            for s in metric.samples
            if s.name == "kvstore_requests_total"
        }
        assert sum(answered.values()) > 100
        assert not [k for k in answered if k[1] in ("INTERNAL", "UNKNOWN")], answered
