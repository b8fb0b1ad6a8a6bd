"""Audits at publish time: a listing that asks for one (or a node whose --market-audit-rate asks)
is "pending audit", served to nobody, until a recompute of that many blocks passes; a failed
listing stays failed whoever republishes it, until a market admin's audit clears it."""

from __future__ import annotations

import json

import pytest
from cryptography.hazmat.primitives import serialization

from kvclient import cli as kvctl
from kvproto.errors import FailedPrecondition
from kvstore import cli as kvstore_cli
from tests.market_fixtures import BLOCK, TOKENS, make_world, store_document

FULL_BLOCKS = 2000 // BLOCK  # 7


@pytest.fixture
def world(make_node, tmp_path):
    w = make_world(make_node, tmp_path)
    yield w
    w.close()


@pytest.fixture
def strict_world(make_node, tmp_path):
    """Nodes whose provider audits 30% of every listing's blocks before serving it."""
    w = make_world(make_node, tmp_path, start=lambda tokens: [
        f"127.0.0.1:{make_node(auth_tokens_file=tokens, market_admins=('auditor',), market_audit_rate=0.3).port}"
        for _ in range(2)])
    yield w
    w.close()


def _store(world, stored_tokens=None) -> bytes:
    return store_document(world, stored_tokens=stored_tokens)


def _files(world, tmp_path, raw: bytes) -> tuple[str, str]:
    manifest, key = tmp_path / "manifest.json", tmp_path / "alpha.pem"
    manifest.write_bytes(raw)
    key.write_bytes(world.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
    return str(manifest), str(key)


def _kvctl(world, tenant: str, *argv: str, capsys) -> tuple[int, dict | str]:
    capsys.readouterr()
    code = kvctl.main(["--nodes", ",".join(world.nodes), "--token", TOKENS[tenant], *argv])
    out = capsys.readouterr()
    try:
        return code, json.loads(out.out[out.out.index("{"):])
    except ValueError:
        return code, out.out + out.err


def test_a_listing_pending_audit_is_served_to_nobody_until_its_audit_passes(world, tmp_path, capsys):
    raw = _store(world)
    alpha = world.market("alpha")
    alpha.publish(raw, world.key, audit_blocks=2)
    alpha.grant("doc-1", "beta")
    [mine] = alpha.listings("doc-1")
    assert (mine.status, mine.audit_blocks) == ("pending audit", 2)
    ids = world.question(seed=11)
    gen = world.buyer("beta")
    assert world.market("beta").listings() == []  # a pending listing is not shown to buyers
    assert gen.generate(ids, 2, do_sample=False).cached_tokens == 0
    # a pass of fewer blocks than asked does not clear it
    with pytest.raises(FailedPrecondition, match="needs an audit of 2 blocks"):
        alpha.mark("doc-1", failed=False, blocks=1)
    # the publisher's own audit (no node rate): recomputes 2 blocks by default, passes, clears it
    code, out = _kvctl(world, "alpha", "audit", "doc-1", "--model", "tiny-qwen3", "--seed", "3", capsys=capsys)
    assert code == 0 and out["ok"] and len(out["blocks"]) == 2 and out["status"] == "ok", out
    result = gen.generate(ids, 6, do_sample=False)
    assert result.cached_tokens >= 1792 and result.new_tokens.tolist() == world.expected(ids)


def test_kvctl_publish_with_an_audit_rate(world, tmp_path, capsys):
    manifest, key = _files(world, tmp_path, _store(world))
    code, out = _kvctl(world, "alpha", "publish", manifest, "--key", key, "--audit-rate", "0.25",
                       "--model", "tiny-qwen3", capsys=capsys)
    assert code == 0 and out["ok"] and out["status"] == "ok", out
    assert len(out["blocks"]) == 2  # ceil(0.25 x 7 full blocks)
    assert world.market("alpha").listings("doc-1")[0].status == "ok"
    # bad input: one line, non-zero, nothing changed
    assert kvctl.main(["--nodes", ",".join(world.nodes), "--token", TOKENS["alpha"], "publish", manifest,
                       "--key", key, "--audit-rate", "0.5"]) != 0
    assert "--audit-rate needs --model" in capsys.readouterr().err
    assert kvctl.main(["--nodes", ",".join(world.nodes), "--token", TOKENS["alpha"], "publish", manifest,
                       "--key", key, "--audit-rate", "1.5", "--model", "tiny-qwen3"]) != 0
    assert "between 0 and 1" in capsys.readouterr().err
    assert world.market("alpha").listings("doc-1")[0].status == "ok"


def test_a_forgery_fails_its_audit_at_publish_and_republishing_clears_nothing(world, tmp_path, capsys):
    other = [(t * 7 + 3) % 512 for t in world.doc]
    raw = _store(world, stored_tokens=other)
    manifest, key = _files(world, tmp_path, raw)
    code, out = _kvctl(world, "alpha", "publish", manifest, "--key", key, "--audit-rate", "0.5",
                       "--model", "tiny-qwen3", "--seed", "0", capsys=capsys)
    assert code == 3 and not out["ok"] and out["status"].startswith("failed: block"), out
    alpha = world.market("alpha")
    alpha.grant("doc-1", "beta")
    alpha.publish(raw, world.key)  # republished without an audit: still failed
    assert alpha.listings("doc-1")[0].status.startswith("failed")
    with pytest.raises(FailedPrecondition, match="only a market admin"):
        alpha.mark("doc-1", failed=False, blocks=FULL_BLOCKS)
    assert world.buyer("beta").generate(world.question(seed=2), 2, do_sample=False).cached_tokens == 0
    # an admin may clear it (here by decision, not by an audit); then it is served again
    assert world.market("auditor").mark("doc-1", failed=False, blocks=FULL_BLOCKS) == "ok"
    assert world.buyer("beta").generate(world.question(seed=2), 2, do_sample=False).cached_tokens >= 1792


def test_a_node_audit_rate_needs_a_market_admin_audit(strict_world, capsys):
    world = strict_world
    raw = _store(world)
    alpha = world.market("alpha")
    alpha.publish(raw, world.key)  # the publisher asked for nothing: the node's 30% applies
    alpha.grant("doc-1", "beta")
    [view] = alpha.listings("doc-1")
    assert (view.status, view.audit_blocks) == ("pending audit", 3)  # ceil(0.3 x 7)
    with pytest.raises(FailedPrecondition, match="market admin"):
        alpha.mark("doc-1", failed=False, blocks=FULL_BLOCKS)
    ids = world.question(seed=5)
    assert world.buyer("beta").generate(ids, 2, do_sample=False).cached_tokens == 0
    code, out = _kvctl(world, "auditor", "audit", "doc-1", "--model", "tiny-qwen3", "--seed", "1", capsys=capsys)
    assert code == 0 and out["ok"] and len(out["blocks"]) == 3 and out["status"] == "ok", out
    assert world.buyer("beta").generate(ids, 2, do_sample=False).cached_tokens >= 1792
    # the same manifest again keeps its pass; records that changed would need a new audit
    alpha.publish(raw, world.key)
    assert alpha.listings("doc-1")[0].status == "ok"


def test_audit_rate_flags_are_checked(tmp_path, capsys):
    assert kvstore_cli.main(["serve", "--data", str(tmp_path / "d"), "--market-audit-rate", "2"]) == 2
    assert "--market-audit-rate must be at least 0 and at most 1, got 2" in capsys.readouterr().err
    assert kvstore_cli.main(["serve", "--data", str(tmp_path / "d"), "--market-audit-rate", "0.1"]) == 2
    assert "--market-audit-rate needs --market-admins" in capsys.readouterr().err
