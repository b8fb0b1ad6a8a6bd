"""Smoke tests of the kvbench scenarios at small sizes (seconds): real nodes, loopback only."""

from __future__ import annotations

import json

import pytest

from bench import cli, economics as ec, sockserve
from bench.netns import LinkSpec, NetnsLab, netns_unavailable_reason
from bench.servers import socket_server


def test_socket_baseline_round_trip():
    with socket_server() as srv, sockserve.connect(f"127.0.0.1:{srv.port}") as sock:
        assert sockserve.put_records(sock, [b"x" * 100_000] * 3) > 0
        assert sockserve.get_records(sock, [100_000] * 3) > 0


def test_transport_smoke(tmp_path):
    cli.main(["transport", "--out", str(tmp_path), "--records", "4", "--record-mib", "1", "--repeats", "1",
              "--no-progress"])
    doc = json.loads((tmp_path / "transport.json").read_text())
    for key in ("grpc_get_gbps", "grpc_put_gbps", "socket_gbps", "ratio_get"):
        assert doc[key] > 0
    assert doc["ratio_get"] == pytest.approx(doc["grpc_get_gbps"] / doc["socket_gbps"])
    assert (tmp_path / "transport.png").stat().st_size > 0


def test_topology_loopback_smoke(tmp_path):
    cli.main(["topology", "--out", str(tmp_path), "--tokens", "600", "--scale", "0.1", "--loopback-only",
              "--no-progress"])
    doc = json.loads((tmp_path / "topology.json").read_text())
    assert doc["extrapolated"] and doc["measured_tokens"] == 60
    assert [link["name"] for link in doc["links"]] == ["co-located (LMDB map)", "co-located (gRPC loopback)"]
    for link in doc["links"]:
        assert link["fetch_seconds"] > 0 and link["measured_bps"] > 0
        assert link["verdict"] in ("fetch", "recompute")
        assert set(link) >= {"name", "configured_bps", "measured_bps", "fetch_seconds", "egress_usd",
                             "prefill_seconds", "prefill_usd", "verdict"}
    assert doc["links"][0]["reads"]["colocated"] > 0  # the LMDB-map link really took the fast path
    assert doc["crossover_bps"] == pytest.approx(ec.crossover_bps(ec.kv_bytes(600), 600 / ec.PAPER.prefill_tokens_per_s))
    assert doc["cross_provider_recompute_at_any_bandwidth"] is True


def test_economics_reads_other_results(tmp_path):
    (tmp_path / "reuse.json").write_text(json.dumps({
        "params": {"model": "m"}, "kv_bytes_per_token": 46080,
        "rows": [{"tokens": 256, "transport": "local", "prefill_seconds": 1.0, "reuse_seconds": 0.1, "ratio": 10.0}]}))
    cli.main(["economics", "--out", str(tmp_path), "--from", str(tmp_path)])
    doc = json.loads((tmp_path / "economics.json").read_text())
    assert doc["measured"]["reuse"][0]["n_star"] == pytest.approx(10 / 9)
    assert doc["model"]["kv_bytes_per_token"] == 147_456
    assert "N* 1.11" in (tmp_path / "economics.md").read_text()


def test_cost_overrides():
    args = cli.build_parser().parse_args(["economics", "--preset", "h100", "--gpu-usd-per-hour", "2"])
    from bench.econ_scenario import cost_preset

    preset = cost_preset(args)
    assert preset.gpu_usd_per_hour == 2 and preset.prefill_tokens_per_s == ec.H100.prefill_tokens_per_s


@pytest.mark.skipif(netns_unavailable_reason() is not None, reason="needs root and ip netns")
def test_tbf_link_rate_within_10_percent():
    link = LinkSpec("shaped", 100_000_000)
    with NetnsLab([link]) as lab, socket_server("0.0.0.0:7071", lab.server_ns):
        from bench.servers import run_worker

        got = run_worker(lab.client_ns, "probe", "--addr", f"{lab.server_ip(link)}:7071", "--bytes", str(6 << 20))
        names = lab.server_ns, lab.client_ns
    assert 0.9 <= got["bps"] / link.rate_bps <= 1.05
    import subprocess

    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(n in listed for n in names)  # cleaned up


def test_load_smoke(tmp_path):
    """kvbench load on the tiny model: every figure the issue asks for, reuse exact on every path."""
    cli.main(["load", "--out", str(tmp_path), "--model", "tiny-qwen3", "--lengths", "64,256", "--reuse-lengths", "96",
              "--repeats", "1", "--threads", "1,2", "--no-progress"])
    doc = json.loads((tmp_path / "load.json").read_text())
    figures = doc["figures"] if "figures" in doc else doc
    for key in ("memcpy_gbps", "colocated_gbps", "grpc_gbps", "colocated_unverified_gbps"):
        assert 0 < figures[key] < 1000, key  # GB/s: measured, and not a division by ~0
    assert 0 <= figures["load_per_token_spread"] < 10
    rows = figures["rows"]
    assert {(r["transport"], r["torch_threads"]) for r in rows} == {
        (t, n) for t in ("colocated", "colocated-unverified", "colocated-pipelined", "grpc") for n in (1, 2)}
    assert all(r["exact_first_token"] and r["cached_tokens"] == 95 for r in rows)
    assert all(r["resident_seconds"] > 0 and r["of_ceiling"] == pytest.approx(r["ratio"] / r["ceiling_ratio"])
               for r in rows)
    assert (tmp_path / "load.md").exists() and (tmp_path / "load.png").exists()


def test_stripe_smoke(tmp_path):
    """kvbench stripe on loopback: every mode fetches the whole document; striped spreads a block."""
    cli.main(["stripe", "--out", str(tmp_path), "--tokens", "256", "--repeats", "1", "--loopback-only",
              "--no-progress"])
    doc = json.loads((tmp_path / "stripe.json").read_text())
    rows = {r["mode"]: r for r in doc["rows"]}
    assert set(rows) == {"primaries", "striped", "striped-2-streams"}
    assert all(r["blocks"] == 1 and r["seconds"] > 0 and r["bytes"] == 256 * 147_456 for r in rows.values())
    assert rows["primaries"]["busiest_node_share"] == 1.0
    assert rows["striped"]["busiest_node_share"] == pytest.approx(1 / 3)
    assert doc["netns_skipped"] == "--loopback-only"
    assert (tmp_path / "stripe.md").exists() and (tmp_path / "stripe.png").exists()
