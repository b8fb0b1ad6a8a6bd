"""Withdrawing a listing: nobody loads it after, its storage stops accruing, grants and meter
entries stay, and publishing it again lists it anew (billing counts both periods)."""

from __future__ import annotations

import time

import pytest

from kvclient import cli as kvctl
from kvproto.errors import NotFound
from tests.market_fixtures import TOKENS, publish, world  # noqa: F401


def test_withdraw_stops_loads_and_storage_and_a_republish_lists_it_again(world, capsys):  # noqa: F811
    publish(world)
    alpha = world.market("alpha")
    alpha.grant("doc-1", "beta")
    ids = world.question(seed=21)
    gen = world.buyer("beta")
    assert gen.generate(ids, 2, do_sample=False).cached_tokens >= 1792
    with pytest.raises(NotFound):  # not beta's to withdraw, and it cannot tell it exists
        world.market("beta").withdraw("doc-1")
    assert kvctl.main(["--nodes", ",".join(world.nodes), "--token", TOKENS["alpha"], "withdraw", "doc-1"]) == 0
    assert "withdrawn doc-1 at" in capsys.readouterr().out
    assert world.market("beta").listings() == []
    later = gen.generate(ids, 6, do_sample=False)
    assert later.cached_tokens == 0 and later.new_tokens.tolist() == world.expected(ids)
    [view] = alpha.listings("doc-1")
    assert view.withdrawn_ns and view.grants == ["beta"]
    stored = alpha.usage()["alpha"].token_hours_stored
    time.sleep(0.3)
    assert alpha.usage()["alpha"].token_hours_stored == stored  # stopped accruing at the withdrawal
    first = view.withdrawn_ns - view.published_ns
    assert stored == pytest.approx(2000 * first / 3.6e12)
    # published again: served again under the old grants, both periods billed
    publish(world)
    [again] = alpha.listings("doc-1")
    assert not again.withdrawn_ns and again.earlier == [(view.published_ns, view.withdrawn_ns)]
    assert gen.generate(ids, 2, do_sample=False).cached_tokens >= 1792
    now = time.time_ns()
    both = alpha.usage(until_ns=now)["alpha"].token_hours_stored
    assert both == pytest.approx(2000 * (first + now - again.published_ns) / 3.6e12)
    # the buyer's loads from both periods stay metered
    assert world.market("beta").usage()["beta"].tokens_loaded >= 2 * 1792
