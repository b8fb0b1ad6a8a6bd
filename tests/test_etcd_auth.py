"""Auth clusters on etcd: the cluster's peer token lets the nodes' agents (rebalancer, durable
hints) copy every tenant's records, while tenants keep to their own key spaces and the copies
are metered as nobody's writes or loads."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
import time
import urllib.request

import grpc
import pytest

from kvclient import Client
from kvclient.node import Credentials, NodeConnection
from kvproto.errors import InvalidArgument, Unauthenticated
from kvproto.hints import is_hint
from kvproto.pb import SERVICE_NAME
from kvproto.pb import kvcache_pb2 as pb
from kvstore.auth import tenant_prefix
from kvstore.ledger import group_id
from kvstore.peers import Peer
from tests import etcd_server
from tests.conftest import REPO
from tests.etcd_server import free_port, needs_etcd
from tests.test_etcd_membership import etcd_node, wait_for

etcd = etcd_server.etcd  # the fixture

TOKEN_A = "token-of-tenant-a-0123456789abcdef"
TOKEN_B = "token-of-tenant-b-0123456789abcdef"
PEER = "peer-token-of-the-cluster-0123456789"


@pytest.fixture
def auth_files(tmp_path) -> tuple[str, str]:
    """(tokens file, peer token file), the peer token 0600 as the README says."""
    tokens, peer = tmp_path / "tokens.txt", tmp_path / "peer.token"
    tokens.write_text(f"{TOKEN_A} alpha\n{TOKEN_B} beta\n")
    peer.write_text(PEER + "\n")
    os.chmod(peer, 0o600)
    return str(tokens), str(peer)


def _blocks(tag: str, n: int) -> dict[bytes, bytes]:
    """Block records as inference writes them (h ‖ uint16 layer, 4 layers): metered as blocks."""
    return {hashlib.sha256(f"{tag}-{i // 4}".encode()).digest() + (i % 4).to_bytes(2, "little"): random.randbytes(300)
            for i in range(n)}


def _on_owners(client: Client, token: str, keys: list[bytes]) -> bool:
    """Every key on each of its ring owners, asked with the tenant's own token."""
    by_node: dict[str, list[bytes]] = {}
    for key in keys:
        for node in client.ring.owners(key, client.replication):
            by_node.setdefault(node, []).append(key)
    for node, owned in by_node.items():
        conn = NodeConnection(node, Credentials(token=token))
        try:
            if not all(conn.lookup(owned, 5)):
                return False
        except Exception:  # noqa: BLE001 - a node that does not answer yet: not replicated
            return False
        finally:
            conn.close()
    return True


def _metric(port: int, name: str, tenant: str | None = None) -> float:
    labels = f'{{tenant="{tenant}"}}' if tenant is not None else ""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        for line in reply.read().decode().splitlines():
            if line.startswith(f"{name}{labels} "):
                return float(line.split()[-1])
    return 0.0


@needs_etcd
def test_join_and_sigkill_rebalance_every_tenant_on_an_auth_cluster(etcd, spawn_node, auth_files):
    tokens, peer = auth_files
    ports = [free_port() for _ in range(4)]

    def start(port: int):
        return etcd_node(spawn_node, etcd, extra=["--auth-tokens", tokens, "--peer-token-file", peer,
                                                  "--metrics-port", str(port)])

    nodes = [start(p) for p in ports[:3]]
    data = {TOKEN_A: _blocks("alpha", 400), TOKEN_B: _blocks("beta", 400)}
    clients = {t: Client(etcd=etcd.endpoint, cluster="t", token=t, timeout=3, edge=False) for t in data}
    try:
        a, b = clients[TOKEN_A], clients[TOKEN_B]
        wait_for(lambda: len(a.ring.nodes) == 3 and len(b.ring.nodes) == 3, 5.0)
        for token, items in data.items():
            clients[token].put_many(list(items.items()))
        written = {p: _metric(p, "kvstore_tenant_blocks_written_total", "alpha") for p in ports[:3]}
        assert sum(written.values()) == 2 * 100  # 100 blocks, each on 2 owners

        began = time.monotonic()
        joined = start(ports[3])
        wait_for(lambda: a.membership.view.members.get(joined.address) is not None
                 and a.membership.view.members[joined.address].state == "ready", 30.0)
        join_s = time.monotonic() - began
        moved = int(_metric(ports[3], "kvstore_rebalance_moved_total"))
        assert moved > 0  # it pulled (through the peer token), nobody ran a command
        wait_for(lambda: joined.address in a.ring.nodes and joined.address in b.ring.nodes, 5.0)
        for token, items in data.items():  # the new node holds what it owns, of both tenants
            mine = [k for k in items if joined.address in clients[token].ring.owners(k, 2)]
            assert mine
            wait_for(lambda t=token, keys=list(items): _on_owners(clients[t], t, keys), 20.0, step=0.2)
        time.sleep(1.2)  # the meter flushes its totals every second
        for port in ports:  # the agents' copies are no tenant's writes or loads
            assert _metric(port, "kvstore_tenant_records_served_total", "alpha") == 0
        assert _metric(ports[3], "kvstore_tenant_blocks_written_total", "alpha") == 0
        assert {p: _metric(p, "kvstore_tenant_blocks_written_total", "alpha") for p in ports[:3]} == written

        for token, items in data.items():  # each tenant reads all of its own, none of the other's
            keys = list(items)
            assert clients[token].get_many(keys) == [items[k] for k in keys]
        assert b.get_many(list(data[TOKEN_A])[:50]) == [None] * 50

        nodes[0].kill()  # SIGKILL: the survivors refill at lease expiry, nobody runs a command
        killed = time.monotonic()
        wait_for(lambda: nodes[0].address not in a.ring.nodes and nodes[0].address not in b.ring.nodes, 10.0)
        gone_s = time.monotonic() - killed
        heal_s = max(wait_for(lambda t=t, keys=list(items): _on_owners(clients[t], t, keys), 30.0, step=0.2)
                     for t, items in data.items())
        print(f"auth cluster: join ready {join_s:.2f} s after start ({moved} records pulled); SIGKILL out of the ring after {gone_s:.2f} s, "
              f"every key of both tenants on 2 owners {heal_s:.2f} s later")
        for token, items in data.items():
            keys = list(items)
            assert clients[token].get_many(keys) == [items[k] for k in keys]
    finally:
        for client in clients.values():
            client.close()


def test_kvctl_put_with_a_replica_down_reaches_it_with_a_tenant_token(spawn_node, auth_files, tmp_path):
    """The hint is the tenant's record (its prefix); the node delivers it with the peer token."""
    tokens, peer = auth_files
    extra = ["--auth-tokens", tokens, "--peer-token-file", peer]
    a, b = spawn_node(extra=extra), spawn_node(extra=extra)
    nodes = f"{a.address},{b.address}"
    b.kill()
    src = tmp_path / "in.bin"
    src.write_bytes(b"hinted tenant bytes")
    put = subprocess.run([sys.executable, "-m", "kvclient.cli", "--nodes", nodes, "--token", TOKEN_A, "--timeout", "3",
                          "put", "doc-1", str(src)], check=False, capture_output=True, text=True,
                         timeout=60, cwd=REPO)
    assert put.returncode == 0 and a.address in put.stdout and b.address in put.stderr, put
    b.start()  # same address, same data; kvctl is long gone
    alpha, beta = (NodeConnection(b.address, Credentials(token=t)) for t in (TOKEN_A, TOKEN_B))
    holder = NodeConnection(a.address, Credentials(token=TOKEN_A))
    try:
        wait_for(lambda: alpha.lookup([b"doc-1"], 3) == [True], 15.0, step=0.1)
        assert [v for _, v, _ in alpha.get([b"doc-1"], 3)] == [b"hinted tenant bytes"]
        assert beta.lookup([b"doc-1"], 3) == [False]  # delivered into alpha's space only
        wait_for(lambda: not any(is_hint(k) for k in holder.scan(b"", 100, 3)[0]), 5.0, 0.1)
    finally:
        for conn in (alpha, beta, holder):
            conn.close()


def _serve(args: list[str], tmp_path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "kvstore.cli", "serve", "--listen", "127.0.0.1:0", "--data", str(tmp_path / "n"),
           "--log-level", "ERROR", *args]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=30, cwd=REPO)


def test_bad_peer_token_flags_are_one_line_and_exit_2(auth_files, tmp_path):
    tokens, peer = auth_files
    tenant_as_peer, short = tmp_path / "tenant.token", tmp_path / "short.token"
    tenant_as_peer.write_text(TOKEN_B + "\n")
    short.write_text("short-token\n")
    etcd = ["--etcd", f"127.0.0.1:{free_port()}"]  # refused before etcd is dialled
    cases = [
        (etcd + ["--auth-tokens", tokens], "--etcd with --auth-tokens needs --peer-token-file"),
        (etcd + ["--auth-tokens", tokens, "--peer-token-file", str(tenant_as_peer)], "tenant 'beta'"),
        (["--auth-tokens", tokens, "--peer-token-file", str(short)], "at least 16"),
        (["--auth-tokens", tokens, "--peer-token-file", str(tmp_path / "absent")], "No such file"),
        (["--peer-token-file", peer], "--peer-token-file needs --auth-tokens"),
    ]
    for args, message in cases:
        result = _serve(args, tmp_path)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, (args, result.stderr)
        assert "--peer-token-file" in lines[0] and message in lines[0], (args, lines[0])


def _call(address: str, method: str, request, token: str, reply=pb.ScanResponse):
    with grpc.insecure_channel(address) as channel:
        fn = channel.unary_unary(f"/{SERVICE_NAME}/{method}", lambda m: m.SerializeToString(), reply.FromString)
        return fn(request, timeout=3, metadata=(("authorization", f"Bearer {token}"),))


def test_peer_token_reaches_the_raw_space_and_tenants_do_not(make_node, auth_files):
    tokens, _ = auth_files
    node = make_node(auth_tokens_file=tokens, peer_token=PEER)
    address = f"127.0.0.1:{node.port}"
    key = hashlib.sha256(b"block").digest() + b"\x00\x00"  # layer 0: a metered block
    alpha, beta = tenant_prefix("alpha"), tenant_prefix("beta")
    with Client(address, replication=1, token=TOKEN_A, timeout=3) as a:
        a.put(key, b"alpha's block")
    raw = Peer(address, token=PEER)  # names stored keys: tenant prefix ‖ key
    wrong = Peer(address, token="peer-token-but-not-this-cluster")
    try:
        assert raw.scan_all(3) == [alpha + key]  # the stored keys, every tenant's
        assert raw.get([alpha + key], 3) == [b"alpha's block"]
        with pytest.raises(Unauthenticated):
            wrong.scan_all(3)
        with pytest.raises(Unauthenticated):
            wrong.get([alpha + key], 3)
        # an agent's copy lands in beta's space, in beta's ledger (quota, eviction group, edge
        # rule), and is no write of beta's
        other = hashlib.sha256(b"other").digest() + b"\x00\x00"
        assert raw.put([(beta + other, b"beta's copy")], 3) == 1
        with pytest.raises(InvalidArgument):
            Peer(address, token=PEER).put([(b"short", b"x")], 3)  # no tenant prefix in the key
        node.servicer.market.flush()
        assert node.servicer.market.totals.get(("beta", "blocks_written"), 0) == 0
        assert node.servicer.market.totals.get(("alpha", "records_served"), 0) == 0
        assert node.storage.tenant_usage(beta) > 0
        with node.storage.env.begin(db=node.storage.ledger.lru) as txn:
            assert txn.get(group_id(beta, other)) is not None
    finally:
        raw.close()
        wrong.close()
    with Client(address, replication=1, token=TOKEN_B, timeout=3) as b:
        assert b.get(other) == b"beta's copy"
        assert b.get(key) is None  # alpha's record is not beta's, nor is its stored key
        assert b.get(alpha + key) is None
    # tenants cannot reach the raw space: their Scan is their own space, their keys are prefixed
    assert list(_call(address, "Scan", pb.ScanRequest(), TOKEN_B).keys) == [other]
    # the peer token is for the agents' calls only; the data plane does not know it
    for method, request in (("Stat", pb.StatRequest()), ("Delete", pb.DeleteRequest(keys=[alpha + key]))):
        with pytest.raises(grpc.RpcError) as err:
            _call(address, method, request, PEER)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert node.data_plane is None or node.data_plane.auth.tenant_of(PEER) is None
