"""Shared parts of the market tests: auth nodes, tenants with keys, a published 2,000-token document."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from inference.generator import CachedGenerator
from inference.listings import ListingReader, document_manifest, public_key_hex
from kvclient import Client
from kvclient.market import Market
from tests.conftest_models import plain_tokens, prompt, tiny

TOKENS = {"alpha": "token-of-alpha-publisher-0123456789", "beta": "token-of-beta-buyer-0123456789abc",
          "gamma": "token-of-gamma-buyer-0123456789abc", "auditor": "token-of-the-auditor-0123456789ab"}
BLOCK = 256
DOC_TOKENS = 2000


def tokens_text() -> str:
    return "".join(f"{token} {tenant}\n" for tenant, token in TOKENS.items())


@dataclass
class World:
    nodes: list[str]
    model: torch.nn.Module
    doc: list[int]
    key: Ed25519PrivateKey
    clients: dict

    def client(self, tenant: str, **kw) -> Client:
        if tenant not in self.clients:
            self.clients[tenant] = Client(self.nodes, replication=len(self.nodes), token=TOKENS[tenant], timeout=15, **kw)
        return self.clients[tenant]

    def market(self, tenant: str) -> Market:
        return Market(self.client(tenant))

    def trust(self) -> dict[str, bytes]:
        return {"alpha": bytes.fromhex(public_key_hex(self.key))}

    def buyer(self, tenant: str = "beta") -> CachedGenerator:
        reader = ListingReader(self.client(tenant), self.trust(), refresh_seconds=0)
        return CachedGenerator(self.model, self.client(tenant), tenant_salt=tenant.encode(), block_size=BLOCK,
                               publish=False, listings=reader)

    def question(self, seed: int = 1) -> torch.Tensor:
        return torch.cat([torch.tensor([self.doc]), prompt(24, seed=seed)], dim=1)

    def expected(self, ids: torch.Tensor, new: int = 6) -> list[int]:
        return plain_tokens(self.model, ids, new)[0, ids.shape[1]:].tolist()

    def close(self) -> None:
        for c in self.clients.values():
            c.close()


def store_document(world: World, listing: str = "doc-1", visibility: str = "granted", price: float = 0.5,
                   tokens: list[int] | None = None, stored_tokens: list[int] | None = None) -> bytes:
    """alpha stores the document's KV (of `stored_tokens` if given: a forgery); its manifest."""
    a = world.client("alpha")
    with CachedGenerator(world.model, a, tenant_salt=b"alpha", block_size=BLOCK) as gen:
        tokens = tokens or world.doc
        if stored_tokens is None:
            gen.generate(torch.tensor([tokens]), 1, do_sample=False)
        else:  # the KV of another text under the document's keys
            from inference.blocks import export_segment
            from transformers import DynamicCache

            cache = DynamicCache(config=world.model.config)
            with torch.inference_mode():
                world.model(torch.tensor([stored_tokens]), past_key_values=cache, use_cache=True)
            for key, start, count in gen.plan(tokens).segments():
                a.put_many(export_segment(cache, key, start, count))
        gen.flush()
        return document_manifest(gen, a, tokens, listing, "alpha", price_per_1k_loaded=price,
                                 price_per_1m_token_hours=1.0, visibility=visibility)


def publish(world: World, listing: str = "doc-1", visibility: str = "granted", price: float = 0.5,
            tokens: list[int] | None = None, stored_tokens: list[int] | None = None) -> None:
    """alpha stores the document's KV (of `stored_tokens` if given: a forgery) and lists it."""
    raw = store_document(world, listing, visibility, price, tokens, stored_tokens)
    world.market("alpha").publish(raw, world.key)


def make_world(make_node, tmp_path, nodes: int = 2, start=None) -> World:
    path = tmp_path / "tokens.txt"
    path.write_text(tokens_text())
    if start is None:
        addresses = [f"127.0.0.1:{make_node(auth_tokens_file=str(path), market_admins=('auditor',)).port}"
                     for _ in range(nodes)]
    else:
        addresses = start(str(path))
    doc = prompt(DOC_TOKENS, seed=7)[0].tolist()
    return World(addresses, tiny("tiny-qwen3"), doc, Ed25519PrivateKey.generate(), {})


@pytest.fixture
def world(make_node, tmp_path):
    w = make_world(make_node, tmp_path)
    yield w
    w.close()
