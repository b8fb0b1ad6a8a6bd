"""Tenant security: bearer tokens on every RPC, separate key spaces per tenant, TLS."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import grpc
import pytest

from kvproto.errors import FailedPrecondition
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvclient import Client
from kvproto.errors import KVCacheError
from kvclient.node import Credentials, NodeConnection
from kvproto.pb import SERVICE_NAME, kvcache_pb2 as pb
from kvproto import record
from kvstore.auth import Authenticator, parse_tokens, tenant_prefix

TOKEN_A = "token-of-tenant-a-0123456789abcdef"
TOKEN_A2 = "second-token-of-tenant-a-fedcba98"
TOKEN_B = "token-of-tenant-b-0123456789abcdef"
TOKENS = f"""# token                              tenant
{TOKEN_A}  alpha
{TOKEN_A2} alpha   # rotation: two tokens, one tenant
{TOKEN_B}  beta
"""


@pytest.fixture
def tokens_file(tmp_path):
    path = tmp_path / "tokens.txt"
    path.write_text(TOKENS)
    return str(path)


@pytest.fixture
def auth_node(make_node, tokens_file):
    node = make_node(auth_tokens_file=tokens_file)
    return node, f"127.0.0.1:{node.port}"


def _block_keys(n: int, tag: str = "doc") -> list[bytes]:
    """Keys as inference writes them: h_i ‖ uint16 layer."""
    return [hashlib.sha256(f"{tag}-{i // 4}".encode()).digest() + (i % 4).to_bytes(2, "little") for i in range(n)]


# ---- the tokens file ------------------------------------------------------------------------
def test_tokens_file_parses_comments_and_rotation():
    tokens = parse_tokens(TOKENS)
    assert tokens == {TOKEN_A: "alpha", TOKEN_A2: "alpha", TOKEN_B: "beta"}
    auth = Authenticator(tokens)
    assert auth.tenant_of(TOKEN_B) == "beta" and auth.tenant_of(TOKEN_A2) == "alpha"
    for probe in ("", TOKEN_A[:-1], TOKEN_A + "x", TOKEN_A.upper()):
        assert auth.tenant_of(probe) is None
    assert tenant_prefix("alpha") == hashlib.sha256(b"tenant/alpha").digest()[:16]


@pytest.mark.parametrize(
    "text, message",
    [
        ("only-a-token\n", "line 1: expected 'TOKEN TENANT'"),
        ("t1 a\nt2 b extra\n", "line 2: expected 'TOKEN TENANT'"),
        ("t1 a\nt1 b\n", "line 2: token already given"),
        ("# nothing but comments\n\n", "no 'TOKEN TENANT' lines"),
        ("tök a\n", "printable ASCII"),
    ],
)
def test_malformed_tokens_file_is_rejected(text, message):
    with pytest.raises(ValueError, match=message):
        parse_tokens(text)


def test_malformed_tokens_file_is_one_cli_line(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("a-token tenant and more\n")
    for tokens in (str(bad), str(tmp_path / "missing.txt")):
        result = subprocess.run(
            [sys.executable, "-m", "kvstore.cli", "serve", "--listen", "127.0.0.1:0", "--data",
             str(tmp_path / "data"), "--auth-tokens", tokens],
            capture_output=True, text=True, timeout=60,
        )
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("kvstore: error"), result.stderr
    assert not (tmp_path / "data").exists()  # refused before opening anything


# ---- unauthenticated calls ------------------------------------------------------------------
def _raw_calls(channel: grpc.Channel):
    """Every RPC of the service, called with valid requests: name -> call(metadata)."""
    path = f"/{SERVICE_NAME}/"
    ser = lambda m: m.SerializeToString()  # noqa: E731
    put = channel.stream_unary(path + "Put", ser, pb.PutResponse.FromString)
    get = channel.unary_stream(path + "Get", ser, pb.GetResponse.FromString)
    unary = lambda name, reply: channel.unary_unary(path + name, ser, reply.FromString)  # noqa: E731
    one = pb.PutRequest(key=b"k", size=1, checksum=record.digest(b"k", b"v"), data=b"v")
    return {
        "Put": lambda md: put(iter([one]), metadata=md, timeout=5),
        "Get": lambda md: list(get(pb.GetRequest(keys=[b"k"]), metadata=md, timeout=5)),
        "Lookup": lambda md: unary("Lookup", pb.LookupResponse)(pb.LookupRequest(keys=[b"k"]), metadata=md, timeout=5),
        "Delete": lambda md: unary("Delete", pb.DeleteResponse)(pb.DeleteRequest(keys=[b"k"]), metadata=md, timeout=5),
        "Stat": lambda md: unary("Stat", pb.StatResponse)(pb.StatRequest(), metadata=md, timeout=5),
        "Scan": lambda md: unary("Scan", pb.ScanResponse)(pb.ScanRequest(), metadata=md, timeout=5),
        "LocalInfo": lambda md: unary("LocalInfo", pb.LocalInfoResponse)(pb.LocalInfoRequest(), metadata=md, timeout=5),
    }


@pytest.mark.parametrize(
    "metadata",
    [
        None,
        (("authorization", "Bearer not-a-known-token"),),
        (("authorization", f"Basic {TOKEN_A}"),),
        (("authorization", TOKEN_A),),
        (("authorization", "Bearer "),),
        (("authorization", f"Bearer {TOKEN_A}"), ("authorization", f"Bearer {TOKEN_B}")),
    ],
    ids=["no-token", "unknown", "wrong-scheme", "no-scheme", "empty", "two-headers"],
)
def test_every_rpc_refuses_unauthenticated_calls(auth_node, metadata):
    node, address = auth_node
    with grpc.insecure_channel(address) as channel:
        for name, call in _raw_calls(channel).items():
            with pytest.raises(grpc.RpcError) as err:
                call(metadata)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
        # ... while the health service stays open, and a good token works on every RPC
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        for name, call in _raw_calls(channel).items():
            if name == "LocalInfo":  # authenticated, but the fast path is off on an auth node
                with pytest.raises(grpc.RpcError) as err:
                    call((("authorization", f"Bearer {TOKEN_A}"),))
                assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                continue
            call((("authorization", f"Bearer {TOKEN_A}"),))
    assert node.storage.stats().records == 0  # the refused Put stored nothing (the good one's k was deleted)


def test_garbage_from_an_unauthenticated_caller_is_unauthenticated(auth_node):
    _, address = auth_node
    with grpc.insecure_channel(address) as channel:
        with pytest.raises(grpc.RpcError) as err:
            channel.unary_unary(f"/{SERVICE_NAME}/Lookup")(b"\xff\xff\xff", timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


# ---- tenant key spaces ----------------------------------------------------------------------
def test_cross_tenant_probes_find_nothing_and_delete_nothing(auth_node):
    node, address = auth_node
    keys = _block_keys(16) + [b"generic-key"]
    values = {k: b"alpha:" + k * 3 for k in keys}
    with Client([address], replication=1, token=TOKEN_A) as alpha, \
            Client([address], replication=1, token=TOKEN_B) as beta, \
            Client([address], replication=1, token=TOKEN_A2) as alpha2:
        alpha.put_many(list(values.items()))
        assert alpha2.get_many(keys) == [values[k] for k in keys]  # same tenant, other token

        # beta computes alpha's keys exactly: every probe misses
        assert beta.exists(keys) == [False] * len(keys)
        assert beta.lookup(keys) == 0
        assert beta.get_many(keys) == [None] * len(keys)
        assert beta.conn(address).scan(b"", 1000, 5) == ([], False)
        assert beta.delete(keys) == 0
        assert alpha.get_many(keys) == [values[k] for k in keys]

        # beta writes the same keys: its own records, alpha's untouched
        beta.put_many([(k, b"beta:" + k) for k in keys])
        assert beta.get_many(keys) == [b"beta:" + k for k in keys]
        assert alpha.get_many(keys) == [values[k] for k in keys]
        assert beta.delete(keys) == len(keys)
        assert alpha.get_many(keys) == [values[k] for k in keys]
        assert sorted(alpha.conn(address).scan(b"", 1000, 5)[0]) == sorted(keys)

        # the fast path is off on an auth node (tests/test_colocated.py covers the opt-in)
        with pytest.raises(FailedPrecondition):
            alpha.conn(address).local_info(5)
    # on disk, alpha's records live only under alpha's prefix
    with node.storage.env.begin(db=node.storage.data_db) as txn:
        stored = [bytes(k) for k, _ in txn.cursor()]
    assert stored and all(k.startswith(tenant_prefix("alpha")) for k in stored)


# ---- TLS ------------------------------------------------------------------------------------
def _self_signed(directory, name: str = "node") -> tuple[str, str]:
    """A throwaway certificate for 127.0.0.1/localhost (the openssl CLI; `cryptography` is not
    a dependency). It is its own CA."""
    key, cert = directory / f"{name}.key", directory / f"{name}.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )
    return str(cert), str(key)


def test_tls_and_token_round_trip(make_node, tokens_file, tmp_path):
    cert, key = _self_signed(tmp_path)
    node = make_node(auth_tokens_file=tokens_file, tls_cert=cert, tls_key=key)
    address = f"127.0.0.1:{node.port}"
    value = bytes(range(256)) * 5000  # over one chunk
    with Client([address], replication=1, token=TOKEN_A, tls_ca=cert, timeout=5) as client:
        client.put(b"secret", value)
        assert client.get(b"secret") == value

    ca = open(cert, "rb").read()
    with pytest.raises(KVCacheError) as err:  # TLS but no token
        NodeConnection(address, Credentials(tls_ca=ca)).lookup([b"secret"], 5)
    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED

    other_ca, _ = _self_signed(tmp_path, "other")
    for creds in (Credentials(token=TOKEN_A), Credentials(token=TOKEN_A, tls_ca=open(other_ca, "rb").read())):
        conn = NodeConnection(address, creds)  # plaintext, or a CA that did not sign the node's cert
        with pytest.raises(KVCacheError) as err:
            conn.lookup([b"secret"], 3)
        assert err.value.code == grpc.StatusCode.UNAVAILABLE
        conn.close()


def test_tls_flags_go_together(make_node, tmp_path):
    cert, _ = _self_signed(tmp_path)
    with pytest.raises(ValueError, match="go together"):
        make_node(tls_cert=cert)
