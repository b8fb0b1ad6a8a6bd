"""The context market on real auth nodes with a real (tiny) model: listings, grants, provenance, audit."""

from __future__ import annotations

import grpc
import pytest

from inference.listings import audit_listing
from kvproto import market as mk
from kvproto.errors import InvalidArgument, NotFound
from kvproto.keys import record_key
from tests.market_fixtures import BLOCK, publish, world  # noqa: F401 - the fixture


def test_grant_lets_a_tenant_load_a_published_document_and_revoke_ends_it(world):  # noqa: F811
    publish(world)
    ids = world.question()
    want = world.expected(ids)
    gen = world.buyer("beta")

    before = gen.generate(ids, 6, do_sample=False)
    assert before.cached_tokens == 0 and before.new_tokens.tolist() == want
    assert world.market("beta").listings() == []  # cannot tell it exists
    # probing the listing's keys directly: plain misses, as for a key nobody stored
    view = world.market("alpha").listings()[0]
    probe = [mk.listing_key(k, view.manifest.tag, b"\0" * 8) for k, _, _ in view.manifest.records]
    assert world.client("beta").exists(probe) == [False] * len(probe)
    assert world.client("beta").get_many(probe[:2]) == [None, None]
    with pytest.raises(NotFound):
        world.market("beta").grant("doc-1", "beta")  # not its listing: as absent as any other name

    assert world.market("alpha").grant("doc-1", "beta")
    after = gen.generate(ids, 6, do_sample=False)
    assert after.cached_tokens >= 1792 and after.new_tokens.tolist() == want
    assert gen.listings.stats["listing_routes"] == 1

    world.market("alpha").revoke("doc-1", "beta")
    again = gen.generate(ids, 6, do_sample=False)
    assert again.cached_tokens == 0 and again.new_tokens.tolist() == want


def test_public_listing_needs_no_grant(world):  # noqa: F811
    publish(world, visibility="public")
    ids = world.question(seed=3)
    result = world.buyer("gamma").generate(ids, 4, do_sample=False)
    assert result.cached_tokens == 7 * BLOCK and result.new_tokens.tolist() == world.expected(ids, 4)


def test_a_forged_record_is_rejected_by_provenance_and_recomputed(world):  # noqa: F811
    publish(world, visibility="public")
    view = world.market("alpha").listings()[0]
    # alpha replaces block 3, layer 1 after publishing: a valid store checksum, another SHA-256
    key = record_key(view.manifest.records[0][0][:32], 0)
    target = [k for k, _, _ in view.manifest.records if k[-2:] == b"\x01\x00"][3]
    a = world.client("alpha")
    value = bytearray(a.get(target))
    value[-1] ^= 0x01
    a.delete([target])
    a.put(target, bytes(value))
    assert key  # the document's first record is untouched
    ids = world.question(seed=4)
    gen = world.buyer("beta")
    result = gen.generate(ids, 6, do_sample=False)
    assert result.cached_tokens == 3 * BLOCK  # blocks 0-2 loaded, 3.. recomputed
    assert result.miss_reasons["provenance"] == 1 and gen.listings.stats["provenance_rejected"] == 1
    assert result.new_tokens.tolist() == world.expected(ids)
    # the node credits the rejection: it checks that the stored record really differs
    entries = world.market("beta").entries()
    assert [e.kind for e in entries if e.kind == "rejected"] == ["rejected"]


def test_audit_flags_kv_of_another_text_and_the_listing_is_no_longer_served(world):  # noqa: F811
    other = [(t * 7 + 3) % 512 for t in world.doc]
    publish(world, visibility="public", stored_tokens=other)
    ids = world.question(seed=5)
    gen = world.buyer("beta")
    # the forgery passes every digest: the manifest was signed over the forged records
    assert gen.generate(ids, 2, do_sample=False).cached_tokens == 7 * BLOCK
    from kvclient import cli as kvctl
    from tests.market_fixtures import TOKENS

    code = kvctl.main(["--nodes", ",".join(world.nodes), "--token", TOKENS["auditor"], "audit", "doc-1",
                       "--model", "tiny-qwen3", "--blocks", "4", "--seed", "0"])
    assert code == 3  # flagged, and marked failed on every node
    assert world.market("auditor").listings("doc-1")[0].status.startswith("failed: block")
    later = gen.generate(ids, 6, do_sample=False)
    assert later.cached_tokens == 0 and later.new_tokens.tolist() == world.expected(ids)


def test_an_honest_listing_passes_its_audit(world):  # noqa: F811
    publish(world, visibility="public")
    view = world.market("auditor").listings("doc-1")[0]
    assert audit_listing(world.client("auditor"), view, world.model, k=4, seed=1).ok


def test_bad_publications_are_refused_and_nothing_is_listed(world):  # noqa: F811
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from kvclient.market import Market
    from kvproto.pb import kvcache_pb2 as pb

    publish(world, listing="good")
    view = world.market("alpha").listings("good")[0]
    raw = view.manifest.raw
    m = world.market("alpha")
    node = world.nodes[0]
    signature, public = mk.sign(world.key, raw)
    forged = mk.sign(Ed25519PrivateKey.generate(), raw)[0]
    cases = {
        "not signed": pb.PublishRequest(manifest=raw.replace(b'"good"', b'"x1"'), public_key=public),
        "does not verify": pb.PublishRequest(manifest=raw.replace(b'"good"', b'"x2"'), signature=forged,
                                             public_key=public),
    }
    for why, request in cases.items():
        with pytest.raises(InvalidArgument, match=why):
            m._call(node, "Publish", request)
    # a manifest naming blocks alpha does not hold (other tokens): refused by the client and the node
    other = mk.build_manifest(listing="x3", publisher="alpha", fingerprint=view.manifest.fingerprint,
                              namespace=view.manifest.namespace, block_size=BLOCK, layers=2, token_ids=[1] * 300,
                              records=[(bytes(34), bytes(32), 256)], price_per_1k_loaded=1.0)
    with pytest.raises(InvalidArgument, match="do not hold"):
        m.publish(other, world.key)
    sig, pub = mk.sign(world.key, other)
    with pytest.raises(Exception, match="does not hold"):
        m._call(node, "Publish", pb.PublishRequest(manifest=other, signature=sig, public_key=pub))
    # another tenant's manifest, a negative price, a grant to an unknown tenant
    beta = Market(world.client("beta"))
    with pytest.raises(InvalidArgument, match="publisher"):
        beta._call(node, "Publish", pb.PublishRequest(manifest=raw, signature=signature, public_key=public))
    with pytest.raises(ValueError, match="price"):
        mk.build_manifest(listing="x4", publisher="alpha", fingerprint="00", namespace=bytes(32), block_size=1,
                          layers=1, token_ids=[1], records=[(bytes(34), bytes(32), 1)], price_per_1k_loaded=-1)
    bad_price = raw.replace(b'"per_1k_loaded":0.5', b'"per_1k_loaded":-0.5')
    with pytest.raises(InvalidArgument, match="price"):
        m._call(node, "Publish", pb.PublishRequest(manifest=bad_price, signature=mk.sign(world.key, bad_price)[0],
                                                   public_key=public))
    with pytest.raises(InvalidArgument, match="unknown tenant"):
        m.grant("good", "nobody")
    conn = world.client("alpha").conn(node)
    raw_publish = conn.channel.unary_unary("/kvcache.v1.KVCache/Publish")
    with pytest.raises(grpc.RpcError) as bad:
        raw_publish(b"\xff\xff garbage", metadata=conn.metadata, timeout=5)
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.manifest.listing for v in m.listings()] == ["good"]  # nothing else listed, nothing lost


def test_listing_keys_are_read_only(world):  # noqa: F811
    publish(world, visibility="public")
    view = world.market("beta").listings()[0]
    key = mk.listing_key(view.manifest.records[0][0], view.manifest.tag, b"\1" * 8)
    with pytest.raises(InvalidArgument, match="read-only"):
        world.client("beta").put_many([(key, b"x" * 64)])
