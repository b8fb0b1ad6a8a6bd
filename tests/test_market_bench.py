"""kvbench market's pricing (pure) and kvctl's time parsing."""

from __future__ import annotations

import pytest

from bench.market import MarketParams, price
from kvclient.market_cli import parse_time, period


def test_market_pricing_from_a_measured_ratio():
    p = MarketParams(buyers=50, documents=10, loads_per_buyer=4)
    out = price(p, {"ratio": 40.0})
    assert sum(out["loads_per_document"]) == 200
    assert out["loads_per_document"][0] == max(out["loads_per_document"])  # Zipf: rank 1 is the most read
    assert out["buyer_break_even_loads"] == pytest.approx(40 / 39)
    assert 0 < out["buyer_saving"] < 1
    fee = p.doc_tokens / 1000 * p.price_per_1k_loaded
    write = p.doc_tokens * 3.0 / 1e6 * 1.25
    assert out["publisher_break_even_loads"] == pytest.approx(write / (fee * (1 - p.market_fee)))


def test_times_and_periods():
    assert parse_time("1700000000") == 1_700_000_000 * 10**9
    assert parse_time("2h", now=10_000.0) == int((10_000 - 7200) * 1e9)
    assert parse_time("2026-01-01T00:00:00") == parse_time("2026-01-01T00:00:00+00:00")
    assert period("..") == (0, 0)
    with pytest.raises(ValueError, match="ISO 8601"):
        parse_time("yesterday-ish")
    with pytest.raises(ValueError, match="START..END"):
        period("2026-01-01")
