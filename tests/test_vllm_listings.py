"""The vLLM connector reads the context market's listings (docs/market.md, "vLLM").

Two `kvstore serve --auth-tokens` nodes (replication 2) and two real vLLM engines of the tiny
random Qwen3, one per tenant, each started once. alpha's engine stores a document (3 store
blocks) and the test process publishes what it stored as a granted listing
(``publish_stored``). beta's engine (listings on, a trust file with alpha's key, vLLM's own
prefix cache off so every request shows what the store gave) asks the same prompt three times:
- before the grant: nothing loaded (its output is the reference: a full prefill);
- after the grant: the listing's 3 blocks load through listing keys, the node meters them for
  beta and the listing, beta's output equals the reference, and beta saves nothing of the chain;
- after alpha replaced block 1's layer-0 record (a valid store checksum, another SHA-256):
  block 0 loads, blocks 1-2 are a ``provenance`` miss and recomputed, the output still equals
  the reference, and the node credits the rejected record.
The settings' bad values fail in one line, and the route's matching and provenance are checked
on a signed manifest, both without an engine.
"""

from __future__ import annotations

import importlib.util
import time

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from inference.listing_match import ListingSource, as_listed, best_listing, leading_runs, trusted_listings
from inference.listings import public_key_hex
from inference.models import tiny_qwen3_dir
from inference.vllm import kv_transfer_config
from inference.vllm.config import ConfigError, ConnectorConfig, request_namespace
from inference.vllm.listings import ListingRoute, publish_stored
from kvclient import Client
from kvclient.market import ListingView, Market
from kvproto import market as mk
from kvproto.keys import block_keys, record_key
from tests.conftest import NodeProcess
from tests.market_fixtures import TOKENS, tokens_text
from tests.test_vllm_connector import _cached, _outputs, tokens

needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed (make venv)")

BLOCK = 256
DOC = tokens(3 * BLOCK, 40)
PROMPT = DOC + tokens(24, 41)
LISTING = "vllm-doc"


def _grew(run: dict, step: str, before: str, key: str) -> float:
    return run[step]["metrics"].get(key, 0) - run[before]["metrics"].get(key, 0)


def _usage_when(market: Market, ready, timeout: float = 30.0):
    """Beta's usage once `ready(usage)` holds: reports reach the node off the engine's threads."""
    deadline = time.monotonic() + timeout
    while True:
        usage = market.usage()
        if ready(usage) or time.monotonic() > deadline:
            return usage
        time.sleep(0.2)


@pytest.fixture(scope="module")
def market_run(tmp_path_factory):
    from inference.vllm.run import Engine

    tmp = tmp_path_factory.mktemp("vllm-market")
    (tmp / "tokens.txt").write_text(tokens_text())
    nodes = [NodeProcess(str(tmp / f"n{i}"), extra=["--auth-tokens", str(tmp / "tokens.txt")]) for i in range(2)]
    key = Ed25519PrivateKey.generate()
    (tmp / "trust.txt").write_text(f"# publishers beta buys from\nalpha {public_key_hex(key)}\n")
    run: dict = {}
    clients: list[Client] = []
    try:
        addresses = [node.start().address for node in nodes]
        alpha, beta = (Client(addresses, replication=2, token=TOKENS[t], colocated=False, timeout=15)
                       for t in ("alpha", "beta"))
        clients += [alpha, beta]
        model = tiny_qwen3_dir()
        seller = kv_transfer_config(addresses, replication=2, token=TOKENS["alpha"], tenant_salt="alpha")
        with Engine(model, kv_transfer_config=seller) as engine:
            run["stored"] = engine.generate([DOC + tokens(24, 42)], max_tokens=4)
            run["identity"] = engine.identity()
        fingerprint, layers = run["identity"]["fingerprint"], run["identity"]["layers"]
        run["manifest"] = publish_stored(
            alpha, namespace=request_namespace(fingerprint, b"alpha", None), fingerprint=fingerprint, tokens=DOC,
            block_size=BLOCK, layers=layers, listing=LISTING, publisher="alpha", private_key=key,
            price_per_1k_loaded=0.5)
        buyer = kv_transfer_config(addresses, replication=2, token=TOKENS["beta"], tenant_salt="beta",
                                   listings=True, trust_file=str(tmp / "trust.txt"), listings_refresh_seconds=0)
        with Engine(model, kv_transfer_config=buyer, prefix_caching=False) as engine:
            run["listings_before"] = Market(beta).listings()
            # another cache_salt: what beta saves of its full prefill stays out of the namespace below
            run["no_grant"] = engine.generate([PROMPT], cache_salt="reference")
            Market(alpha).grant(LISTING, "beta")
            run["granted"] = engine.generate([PROMPT])
            run["usage_granted"] = _usage_when(Market(beta), lambda u: u.get("beta") and u["beta"].tokens_loaded)
            # alpha replaces block 1's layer-0 record: the store's checksum is valid, the SHA-256 is not
            target = record_key(block_keys(run["manifest"].namespace, DOC, BLOCK)[1], 0)
            value = bytearray(alpha.get(target))
            value[-1] ^= 0x01
            alpha.delete([target])
            alpha.put(target, bytes(value))
            run["forged"] = engine.generate([PROMPT])
        own = block_keys(request_namespace(fingerprint, b"beta", None), PROMPT, BLOCK)
        run["own_saved"] = beta.exists([record_key(k, layer) for k in own for layer in range(layers)])
        run["usage"] = _usage_when(Market(beta), lambda u: u.get("beta") and u["beta"].rejected_tokens
                                   and u["beta"].prompt_tokens >= 3 * len(PROMPT))
        run["entries"] = Market(beta).entries()
    finally:
        for client in clients:
            client.close()
        for node in nodes:
            node.terminate()
    return run


@pytest.mark.vllm
@needs_vllm
def test_without_a_grant_nothing_is_loaded(market_run):
    assert market_run["listings_before"] == []  # beta cannot tell the listing exists
    result = market_run["no_grant"]
    assert _cached(result) == [0]
    assert result["metrics"].get("lookup_hit_tokens", 0) == 0 and result["metrics"].get("hit_tokens", 0) == 0


@pytest.mark.vllm
@needs_vllm
def test_granted_listing_loads_the_prefix_and_outputs_equal(market_run):
    run = market_run
    assert _cached(run["granted"]) == [3 * BLOCK]
    assert _grew(run, "granted", "no_grant", "hit_tokens") == 3 * BLOCK
    assert _grew(run, "granted", "no_grant", "listing_hit_tokens") == 3 * BLOCK
    assert _grew(run, "granted", "no_grant", "listing_routes") == 1
    assert _outputs(run["granted"]) == _outputs(run["no_grant"])
    # the node metered the load for the buyer and for the listing: layer-0 tokens, every record once
    usage = run["usage_granted"]
    assert usage["beta"].tokens_loaded == 3 * BLOCK
    assert usage["beta"].records_served == 3 * run["identity"]["layers"]
    assert usage[f"listing:{LISTING}"].tokens_loaded == 3 * BLOCK


@pytest.mark.vllm
@needs_vllm
def test_a_listing_routed_request_saves_nothing(market_run):
    """The publisher's chain is not copied into the buyer's namespace (a free reload of a paid
    listing), and nothing hangs off a chain whose start the buyer lacks."""
    assert market_run["own_saved"] and not any(market_run["own_saved"])


@pytest.mark.vllm
@needs_vllm
def test_a_replaced_record_is_a_provenance_miss_and_recomputed(market_run):
    run = market_run
    assert _grew(run, "forged", "granted", "miss_tokens:provenance") == 2 * BLOCK  # blocks 1 and 2
    assert _grew(run, "forged", "granted", "hit_tokens") == BLOCK  # block 0 still loads
    assert _outputs(run["forged"]) == _outputs(run["no_grant"])
    # reported by the worker and credited by the node: the stored record really differs
    assert [e.records for e in run["entries"] if e.kind == "rejected"] == [1]
    assert run["usage"]["beta"].rejected_tokens == BLOCK


@pytest.mark.vllm
@needs_vllm
def test_prompts_are_reported_for_the_hit_ratio(market_run):
    usage = market_run["usage"]["beta"]
    assert usage.prompt_tokens == 3 * len(PROMPT)
    assert usage.cached_tokens == 2 * 3 * BLOCK  # planned loads; the forged one's recompute not subtracted


@pytest.mark.parametrize("extra, words", [
    ({"listings": True}, "trust_file: required when listings is on"),
    ({"listings": "yes", "trust_file": "x"}, "listings: true or false"),
    ({"listings": True, "trust_file": "/no/such/trust"}, "trust_file: /no/such/trust does not exist"),
    ({"listings": True, "trust_file": 7}, "trust_file: a string"),
    ({"trust_file": "TRUST"}, "trust_file: set listings to true"),
    ({"listings": True, "trust_file": "BAD"}, "line 2: expected 'TENANT HEX-ED25519-KEY'"),
    ({"listings": True, "trust_file": "EMPTY"}, "names no publisher"),
    ({"listings": True, "trust_file": "TRUST", "listings_refresh_seconds": -1}, "listings_refresh_seconds: seconds >= 0"),
    ({"listings": True, "trust_file": "TRUST", "listings_refresh_seconds": "5"}, "listings_refresh_seconds: seconds"),
])
def test_bad_listing_settings_fail_in_one_line(tmp_path, extra, words):
    files = {"TRUST": f"alpha {'ab' * 32}\n", "BAD": "# ok\nalpha not-hex\n", "EMPTY": "# nobody\n"}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    extra = {"nodes": ["a:1"], **extra}
    if extra.get("trust_file") in files:
        extra["trust_file"] = str(tmp_path / extra["trust_file"])
    with pytest.raises(ConfigError) as info:
        ConnectorConfig.from_extra(extra, 16)
    message = str(info.value)
    assert words in message and "\n" not in message and message.startswith("kv_connector_extra_config.")


def test_listing_settings(tmp_path):
    (tmp_path / "trust").write_text(f"alpha {'ab' * 32}  # the publisher\n")
    config = ConnectorConfig.from_extra({"nodes": ["a:1"], "listings": True, "trust_file": str(tmp_path / "trust"),
                                         "listings_refresh_seconds": 0}, 16)
    assert config.trust == (("alpha", bytes.fromhex("ab" * 32)),) and config.listings_refresh_seconds == 0.0
    plain = ConnectorConfig.from_extra({"nodes": ["a:1"]}, 16)
    assert (plain.listings, plain.trust, plain.listings_refresh_seconds) == (False, (), 30.0)


def test_a_route_matches_the_prompt_and_carries_each_records_digest():
    """Pure: what the scheduler gets of a signed two-block listing, and what the worker checks."""
    key, ns, doc = Ed25519PrivateKey.generate(), bytes(range(32)), tokens(32, 43)
    names = [record_key(k, layer) for k in block_keys(ns, doc, 16) for layer in range(2)]
    records = [(name, mk.record_digest(name, b"kv of " + name), 16) for name in names]
    raw = mk.build_manifest(listing="doc", publisher="alpha", fingerprint="ab" * 32, namespace=ns, block_size=16,
                            layers=2, token_ids=doc, records=records, price_per_1k_loaded=0.5)
    view = ListingView(mk.parse_manifest(raw), *mk.sign(key, raw), "ok", [], 1, 0)
    assert trusted_listings([view], {"alpha": bytes(32)}) == []  # not the key the trust file names
    listings = trusted_listings([view], {"alpha": view.public_key})
    assert best_listing(listings, doc, "cd" * 32, 16) is None  # another model
    match = best_listing(listings, doc[:16] + tokens(24, 44), "ab" * 32, 16)
    assert match.run == 1 and match.block_keys == block_keys(ns, doc, 16)[:1]
    match = best_listing(listings, doc + tokens(8, 44), "ab" * 32, 16)
    route = ListingRoute(ListingSource.of(view.manifest), match.block_keys, match.listing)
    assert route.provenance(1) == ((2, records[2][1]), (3, records[3][1]))
    assert [mk.split_listing_key(k)[:2] for k in route.source.probe(route.keys)] == [
        (names[0], view.manifest.tag), (names[2], view.manifest.tag)]
    assert as_listed(names[3], b"kv of " + names[3], records[3][1])
    assert not as_listed(names[3], b"kv of another", records[3][1]) and not as_listed(names[3], b"", b"")
    assert leading_runs([True, False, True, True], 2) == (1, 2)
