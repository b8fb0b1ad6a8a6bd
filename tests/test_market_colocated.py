"""The market with the co-located path on (auth nodes run with --colocated on): reads through the
map are reported to the node's meter, and listing keys are never read through the map."""

from __future__ import annotations

from inference.generator import CachedGenerator
from kvclient import Client
from tests.market_fixtures import BLOCK, TOKENS, make_world, publish


def test_colocated_reads_are_metered_and_listing_keys_go_to_the_node(spawn_node, tmp_path):
    def start(tokens: str) -> list[str]:
        extra = ["--auth-tokens", tokens, "--colocated", "on", "--market-admins", "auditor"]
        return [spawn_node(f"n{i}", extra=extra).address for i in range(2)]

    world = make_world(None, tmp_path, start=start)
    try:
        publish(world)
        ids = world.question(seed=5)
        want = world.expected(ids, 4)
        alpha = world.client("alpha")
        alpha.flush()  # publishing read the records too (their digests): counted before this
        before = world.market("alpha").usage()["alpha"]
        reads_before = alpha.reads["colocated"]
        with CachedGenerator(world.model, alpha, tenant_salt=b"alpha", block_size=BLOCK, publish=False) as gen:
            own = gen.generate(ids, 4, do_sample=False)
        assert own.cached_tokens >= 1792 and own.new_tokens.tolist() == want
        read = alpha.reads["colocated"] - reads_before
        assert read > 0 and alpha.reads["remote"] == 0  # all through the maps
        alpha.flush()
        usage = world.market("alpha").usage()["alpha"]
        # the layer-0 records name their tokens; each record counted once (two replicas, one read)
        assert usage.colocated_tokens - before.colocated_tokens == own.cached_tokens
        assert usage.records_served - before.records_served == read

        assert world.market("alpha").grant("doc-1", "beta")
        # one replica per key: a listing key looked up in the map would be a miss with no second try
        beta = world.clients["beta"] = Client(world.nodes, replication=1, token=TOKENS["beta"], timeout=15)
        bought = world.buyer("beta").generate(ids, 4, do_sample=False)
        assert bought.cached_tokens >= 1792 and bought.new_tokens.tolist() == want
        assert beta.reads["remote"] > 0  # the listing's records came from the nodes, not the maps
        loads = world.market("alpha").usage()["listing:doc-1"]
        assert loads.tokens_loaded == bought.cached_tokens
    finally:
        world.close()
