"""Smoke test of `kvbench peers --quick`: one run, every peer reported (measured, or skipped with
its reason), this store's rows measured, redis measured wherever redis-server is installed."""

from __future__ import annotations

import json
import shutil

import pytest

from bench import cli
from bench.peer_clients import PEERS
from bench.peers import OPS


@pytest.fixture(scope="module")
def doc(tmp_path_factory):
    out = tmp_path_factory.mktemp("peers")
    # one workload, 1 and 2 clients: every peer and op, in half the time (the full run has both)
    cli.main(["peers", "--quick", "--workloads", "qwen3-4b", "--clients", "1,2", "--out", str(out), "--no-progress"])
    assert (out / "peers.png").stat().st_size > 0 and (out / "peers.md").exists()
    return json.loads((out / "peers.json").read_text())


def _entry(doc, workload, peer):
    return next(e for e in doc["peers"] if e["workload"] == workload and e["peer"] == peer)


@pytest.mark.timeout(120)
def test_every_peer_has_a_row(doc):
    assert {(e["workload"], e["peer"]) for e in doc["peers"]} == {
        (w, p) for w in doc["params"]["workloads"] for p in PEERS}
    for e in doc["peers"]:
        assert e["status"] in ("measured", "skipped", "failed")
        if e["status"] != "measured":
            assert e["reason"], e
    assert doc["env"]["cpu_count"] and doc["units"].startswith("GB/s")


def test_this_store_is_measured(doc):
    for w in doc["params"]["workloads"]:
        for peer in ("kvstore-remote", "kvstore-grpc", "kvstore-colocated"):
            e = _entry(doc, w, peer)
            assert e["status"] == "measured" and e["verified"], e
            assert {(r["op"], r["clients"]) for r in e["ops"]} == {(op, n) for op in OPS for n in doc["params"]["clients"]}
            for r in e["ops"]:
                assert r["gbps"] > 0 and 0 < r["p50_ms"] <= r["p99_ms"]
        assert _entry(doc, w, "kvstore-remote")["read_path"]  # data plane or gRPC, as the node said
        assert _entry(doc, w, "kvstore-grpc")["read_path"] == "gRPC"
        colocated = [r for r in _entry(doc, w, "kvstore-colocated")["ops"] if "reads" in r]
        assert colocated and all(r["reads"]["remote"] == 0 for r in colocated)  # the LMDB map, not the network
        assert doc["ratios"][w]["1_clients"]["kvstore-grpc get_many / raw-socket get_many"] > 0
        assert doc["ratios"][w]["1_clients"]["kvstore-remote stream / raw-socket stream"] > 0


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed")
def test_redis_is_measured(doc):
    for w in doc["params"]["workloads"]:
        e = _entry(doc, w, "redis")
        assert e["status"] == "measured" and e["verified"], e
        assert doc["ratios"][w]["1_clients"]["kvstore-grpc get / redis get"] > 0


class _Corrupting:
    """An in-memory peer that flips one byte of one record: it must fail, not score."""

    def __init__(self, store):
        self.store = store

    def put_many(self, items):
        self.store.update(items)

    def get(self, key):
        value = self.store.get(key)
        return value[:-1] + bytes([value[-1] ^ 1]) if key == min(self.store) else value

    def get_many(self, keys):
        return [self.get(k) for k in keys]

    def close(self):
        pass


def test_wrong_bytes_fail_the_peer():
    from bench.peers import WORKLOADS, PeersParams, PeerRun, WrongBytes

    w, store = WORKLOADS["smollm2"], {}
    with pytest.raises(WrongBytes):
        with PeerRun(lambda: _Corrupting(store), w, w.payloads(1), PeersParams(blocks=1, clients=(1,)), 7) as run:
            run.measure_pass("put_many", 1)
            run.measure_pass("get_many", 1)
