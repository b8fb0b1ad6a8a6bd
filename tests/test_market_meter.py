"""Metering and billing on real auth nodes: exact across a SIGKILL and restarts, reconciled with bills."""

from __future__ import annotations

import json
import urllib.request

import pytest

from kvclient import cli as kvctl
from kvclient.billing import bill, tariff_from
from kvproto.market import block_tokens
from tests.market_fixtures import BLOCK, TOKENS, make_world, publish, world  # noqa: F401 - the fixture


@pytest.fixture
def process_world(spawn_node, tmp_path):
    procs = []

    def start(tokens_path: str) -> list[str]:
        for i in range(2):
            procs.append(spawn_node(f"n{i}", ["--auth-tokens", tokens_path, "--market-admins", "auditor"]))
        return [p.address for p in procs]

    w = make_world(None, tmp_path, start=start)
    w.procs = procs
    yield w
    w.close()


def test_five_loads_are_metered_exactly_across_a_sigkill_and_restarts(process_world):
    w = process_world
    publish(w)
    w.market("alpha").grant("doc-1", "beta")
    gen = w.buyer("beta")
    loaded = []
    for i in range(5):
        if i == 2:
            w.procs[1].kill()  # one replica dies mid-way: the other serves (and meters) the rest
        result = gen.generate(w.question(seed=10 + i), 2, do_sample=False)
        assert result.new_tokens.tolist() == w.expected(w.question(seed=10 + i), 2)
        loaded.append(result.cached_tokens)
    assert loaded == [7 * BLOCK] * 5
    w.procs[1].start()  # back with its files: what it counted before the kill is still there
    w.procs[0].terminate()
    w.procs[0].start()  # and a clean restart of the other
    usage = w.market("beta").usage()
    assert usage["beta"].tokens_loaded == sum(loaded)
    assert usage["listing:doc-1"].tokens_loaded == sum(loaded)
    assert usage["beta"].records_served == 5 * 7 * 2  # blocks x layers, each once
    assert usage["beta"].prompt_tokens == 5 * (len(w.doc) + 24) and usage["beta"].token_hit_ratio > 0.85
    # the publisher sees its listing's loads (earnings), not beta's other traffic
    alpha = w.market("alpha").usage()
    assert alpha["listing:doc-1"].tokens_loaded == sum(loaded)
    assert alpha["alpha"].blocks_written == 8 and alpha["alpha"].tokens_written == len(w.doc)
    assert alpha["alpha"].token_hours_stored > 0
    with pytest.raises(Exception, match="NOT_FOUND"):
        w.market("beta").entries(tenant="alpha")  # nobody reads another tenant's meter


def test_bill_reconciles_with_usage_for_three_tenants(world, tmp_path, capsys):  # noqa: F811
    publish(world, visibility="public", price=0.5)
    for tenant, loads in (("beta", 2), ("gamma", 1)):
        gen = world.buyer(tenant)
        for i in range(loads):
            assert gen.generate(world.question(seed=20 + i), 1, do_sample=False).cached_tokens == 7 * BLOCK
    usage = world.market("auditor").usage("*")
    doc_tokens = 7 * BLOCK
    assert usage["beta"].tokens_loaded == 2 * doc_tokens and usage["gamma"].tokens_loaded == doc_tokens
    tariff_file = tmp_path / "tariff.json"
    econ = {"gpu_usd_per_hour": 4.6, "prefill_tokens_per_s": 256.6, "reuse_speedup": 49.7}  # bench.economics paper
    tariff_file.write_text(json.dumps({"preset": "gemini-explicit", "market_fee": 0.25, **econ}))
    code = kvctl.main(["--nodes", ",".join(world.nodes), "--token", TOKENS["auditor"], "bill", "--tariff",
                       str(tariff_file), "--period", ".."])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    by = {s["tenant"]: s for s in out["statements"]}
    tariff = tariff_from({"preset": "gemini-explicit", "market_fee": 0.25, **econ})
    ours = bill(usage, world.market("auditor").listings(), tariff)
    assert {s["tenant"] for s in ours["statements"]} == set(by) == {"alpha", "beta", "gamma"}
    read = tariff.input_usd_per_mtok / 1e6 * tariff.cache_read_multiplier
    for tenant, tokens in (("beta", 2 * doc_tokens), ("gamma", doc_tokens)):
        assert by[tenant]["tokens_loaded"] == tokens
        assert by[tenant]["read_usd"] == pytest.approx(tokens * read)
        assert by[tenant]["listing_fees_usd"] == pytest.approx(tokens / 1000 * 0.5)
        assert by[tenant]["prefill_saved_usd"] > 0 and by[tenant]["input_saved_usd"] > 0
    fees = 3 * doc_tokens / 1000 * 0.5
    assert out["publisher_earnings_usd"]["alpha"] == pytest.approx(fees * 0.75)
    assert by["alpha"]["write_usd"] == pytest.approx(len(world.doc) * tariff.input_usd_per_mtok / 1e6)
    assert by["alpha"]["storage_usd"] > 0  # the listing's token-hours
    total = sum(s["total_usd"] for s in by.values())
    assert total == pytest.approx(out["provider_usd"] + fees * 0.75)  # what tenants pay = provider + publishers


def test_prometheus_counts_tenants_with_bounded_labels(make_node, tmp_path):
    nodes = []
    w = make_world(lambda **kw: nodes.append(make_node(metrics_port=0, **kw)) or nodes[-1], tmp_path, nodes=1)
    try:
        publish(w, visibility="public")
        w.buyer("beta").generate(w.question(), 1, do_sample=False)
        text = _metrics(nodes[0].metrics_port)
        assert f'kvstore_tenant_tokens_loaded_total{{tenant="beta"}} {float(7 * BLOCK)}' in text
        assert 'kvstore_tenant_blocks_written_total{tenant="alpha"} 8.0' in text
        assert 'kvstore_tenant_token_hit_ratio{tenant="beta"}' in text
        labels = {line.split('tenant="')[1].split('"')[0] for line in text.splitlines() if 'tenant="' in line}
        assert labels <= set(TOKENS) | {"other"}  # from the tokens file, never from callers
    finally:
        w.close()


def test_block_tokens_reads_the_layer0_header_only():
    import torch

    from inference.codec import encode

    k = torch.zeros(2, 5, 4)
    assert block_tokens(encode(k, k, 0)) == 5 and block_tokens(encode(k, k, 1)) == 0 and block_tokens(b"xx") == 0


def test_malformed_tariff_is_one_cli_line(tmp_path, capsys):
    bad = tmp_path / "t.json"
    for text, why in (("{", "tariff"), ('{"preset": "nope"}', "unknown preset"), ('{"market_fee": 2}', "share"),
                      ('{"input_usd_per_mtok": "x"}', "finite number"), ('{"extra": 1}', "unknown field")):
        bad.write_text(text)
        assert kvctl.main(["--nodes", "127.0.0.1:1", "bill", "--tariff", str(bad)]) == 1
        err = capsys.readouterr().err
        assert why in err and len(err.strip().splitlines()) == 1


def _metrics(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
