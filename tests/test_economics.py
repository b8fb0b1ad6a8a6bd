"""The cost model against the paper's published figures (DESIGN §7)."""

from __future__ import annotations

import math

import pytest

from bench import economics as ec


def test_qwen3_4b_kv_bytes_per_token():
    assert ec.QWEN3_4B.bytes_per_token == 147_456
    # the paper prints 0.148 MB: 0.1475 MB rounded once more
    assert ec.QWEN3_4B.bytes_per_token / ec.MB == pytest.approx(0.148, abs=0.001)


def test_kv_shape_from_hf_config_dict():
    cfg = {"num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8,
           "head_dim": 128, "hidden_size": 2560}
    assert ec.kv_shape_from_config(cfg, "bfloat16") == ec.QWEN3_4B
    # no explicit head_dim and no GQA: hidden / heads, kv heads = heads (SmolLM2-135M style)
    smol = {"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "hidden_size": 576}
    assert ec.kv_shape_from_config(smol, "float32").bytes_per_token == 30 * 3 * 64 * 2 * 4


def test_document_of_3774_tokens_is_556_mb():
    assert ec.kv_bytes(3774) == 556_498_944
    assert round(ec.kv_bytes(3774) / ec.MB) == 556


def test_egress_per_load():
    assert round(ec.egress_usd(0.54e9), 3) == 0.049  # the paper's "$0.049 per 0.54 GB load"
    # the exact 3774-token KV is 556.5 MB -> $0.050; 0.54 is that count / 1.024e9
    assert round(ec.egress_usd(ec.kv_bytes(3774)), 3) == 0.050
    assert round(ec.kv_bytes(3774) / 1.024e9, 2) == 0.54


@pytest.mark.parametrize("ratio, n_star", [(8.6, 1.13), (49.7, 1.02)])
def test_break_even_reuses(ratio, n_star):
    assert round(ec.break_even_reuses(ratio), 2) == n_star


def test_break_even_without_speedup_is_never():
    assert math.isinf(ec.break_even_reuses(1.0))


def test_paper_preset_egress_is_2_6x_the_prefill_it_saves():
    p = ec.PAPER
    assert ec.prefill_seconds(3774, p.prefill_tokens_per_s) == pytest.approx(14.71)
    saved = ec.prefill_usd(3774, p.prefill_tokens_per_s, p.gpu_usd_per_hour)
    assert ec.egress_usd(0.54e9) / saved == pytest.approx(2.6, abs=0.05)
    assert ec.always_recompute(ec.egress_usd(ec.kv_bytes(3774)), saved)


def test_h100_preset_makes_egress_hundreds_of_times_the_prefill():
    p = ec.H100
    saved = ec.prefill_usd(3774, p.prefill_tokens_per_s, p.gpu_usd_per_hour)
    assert 0.06 <= ec.prefill_seconds(3774, p.prefill_tokens_per_s) <= 0.1
    assert ec.egress_usd(ec.kv_bytes(3774)) / saved > 500


def test_fleet_of_80m_agents():
    same, cross = (ec.fleet_costs(80_000_000, 3774, ec.PAPER, cross_provider=x) for x in (False, True))
    assert same.reprefill_usd == pytest.approx(1.5e6, rel=0.02)
    assert same.reuse_usd == pytest.approx(0.03e6, rel=0.03)
    assert cross.reuse_usd > cross.reprefill_usd  # shipping across providers fails
    assert len(ec.fleet_table(ec.PAPER)) == 6


def test_crossover_bandwidth():
    nbytes = ec.kv_bytes(3774)
    bps = ec.crossover_bps(nbytes, 14.71)
    assert ec.transfer_seconds(nbytes, bps) == pytest.approx(14.71)
    assert 300e6 < bps < 305e6  # the paper's setting: 1 Gbit fetches, 100 Mbit recomputes


def test_fetch_or_recompute():
    assert ec.fetch_or_recompute(1.0, 0.0, 2.0, 4.6).verdict == "fetch"
    assert ec.fetch_or_recompute(3.0, 0.0, 2.0, 4.6).verdict == "recompute"
    assert ec.fetch_or_recompute(0.1, 0.05, 14.71, 4.6).verdict == "recompute"  # egress > prefill $


def test_cached_read_tariff():
    t = ec.CacheTariff(input_usd_per_mtok=3.0, min_cacheable_tokens=1024, ttl_seconds=300)
    assert ec.price_cached_read(1000, t, 10).kind == "uncacheable"
    assert ec.price_cached_read(2000, t, None) == ec.ReadPrice("write", pytest.approx(2000 * 3e-6 * 1.25))
    assert ec.price_cached_read(2000, t, 60) == ec.ReadPrice("hit", pytest.approx(2000 * 3e-6 * 0.1))
    assert ec.price_cached_read(2000, t, 301).kind == "write"  # expired
    t4096 = ec.CacheTariff(min_cacheable_tokens=4096)
    assert ec.price_cached_read(3774, t4096, 1).kind == "uncacheable"


def test_provider_reads_and_break_even():
    t = ec.TARIFF_5MIN
    full = 10 * 2000 * 3e-6
    assert ec.provider_reads_usd(2000, 10, 60, t) < full
    assert ec.provider_reads_usd(2000, 10, 600, t) > full  # every read after the TTL rewrites
    assert ec.provider_break_even_reads(t) == pytest.approx(1.15 / 0.9)
    assert ec.provider_break_even_reads(ec.TARIFF_1H) == pytest.approx(1.9 / 0.9)
