"""Fixtures of the inference tests: tiny seeded models and real stores (in-process LMDB, gRPC node)."""

from __future__ import annotations

import functools
from collections.abc import Iterator

import pytest
import torch

from inference.models import load_model
from kvclient import Client
from kvstore.local import LocalStore
from kvstore.config import ServerConfig
from kvstore.server import create_server
from tests.conftest import NodeProcess, wait_healthy

BLOCK = 32
MODELS = [
    ("tiny-qwen3", torch.float32),
    ("tiny-qwen3", torch.bfloat16),
    ("tiny-llama", torch.float32),
    ("tiny-llama", torch.bfloat16),
]
MODEL_IDS = [f"{name}-{str(dtype).removeprefix('torch.')}" for name, dtype in MODELS]


@functools.lru_cache(maxsize=None)
def tiny(name: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.nn.Module:
    model, _ = load_model(name, dtype=dtype, seed=seed)
    return model


def prompt(length: int, seed: int = 0, vocab: int = 512) -> torch.Tensor:
    return torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(seed))


def plain_tokens(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int = 24) -> torch.Tensor:
    with torch.inference_mode():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False)


@pytest.fixture
def grpc_store(tmp_path) -> Iterator[Client]:
    """A real node on port 0 with LMDB in tmp_path, and a cluster client for it."""
    server, port = create_server(ServerConfig(listen="127.0.0.1:0", data_dir=str(tmp_path / "node"), sync=False,
                                              map_size_gb=1.0))
    wait_healthy(f"127.0.0.1:{port}")
    client = Client([f"127.0.0.1:{port}"], replication=1)
    yield client
    client.close()
    server.node.stop(0)


@pytest.fixture
def local_store(tmp_path) -> Iterator[LocalStore]:
    store = LocalStore(str(tmp_path / "lmdb"), map_size_gb=1.0)
    yield store
    store.close()


@pytest.fixture
def colocated_store(tmp_path) -> Iterator[Client]:
    """A node in its own process, and a client that reads its LMDB map directly (the fast path)."""
    node = NodeProcess(str(tmp_path / "colocated")).start()
    client = Client([node.address], replication=1)
    assert client.reader(node.address) is not None
    yield client
    client.close()
    node.kill()


@pytest.fixture(params=["local", "grpc", "colocated"])
def store(request):
    """Each test that takes `store` runs against both real stores."""
    return request.getfixturevalue(f"{request.param}_store")
