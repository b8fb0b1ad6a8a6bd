"""Shared fixtures: real kvstore nodes on loopback port 0 with real LMDB in temp dirs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvstore.config import ServerConfig
from kvstore.server import Node, build_node

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def wait_healthy(address: str, timeout: float = 20.0) -> None:
    """Block until the node's health service says SERVING (never sleep-and-hope)."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0, wait_for_ready=True)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise
            if time.monotonic() > deadline:
                raise TimeoutError(f"{address} not healthy")


@pytest.fixture(autouse=True)
def internal_errors_raise(monkeypatch):
    """In tests a bug in the load or publish path raises (production counts it: internal_error)."""
    from inference.generator import CachedGenerator

    defaults = dict(CachedGenerator.__init__.__kwdefaults__)
    defaults["internal_errors"] = "raise"
    monkeypatch.setattr(CachedGenerator.__init__, "__kwdefaults__", defaults)


@pytest.fixture
def make_node(tmp_path) -> Iterator:
    """Start in-process nodes: make_node(**config_overrides) -> Node."""
    nodes: list[Node] = []

    def start(**overrides) -> Node:
        data = overrides.pop("data_dir", str(tmp_path / f"node{len(nodes)}"))
        settings = {"listen": "127.0.0.1:0", "sync": False, "map_size_gb": 1.0, **overrides}
        config = ServerConfig(data_dir=data, **settings)
        node = build_node(config)
        nodes.append(node)
        return node

    yield start
    for node in nodes:
        try:
            node.stop(0)
        except Exception:
            pass


@dataclass
class NodeProcess:
    """A node in its own process (for SIGKILL tests)."""

    data_dir: str
    port: int = 0
    proc: subprocess.Popen | None = None
    extra: list[str] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "NodeProcess":
        listen = f"127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "kvstore.cli", "serve", "--listen", listen, "--data", self.data_dir,
               "--map-size-gb", "1", "--no-sync", "--log-level", "WARNING", *self.extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=REPO)
        line = self.proc.stdout.readline()
        if "listening on" not in line:
            raise RuntimeError(f"node did not start: {line!r}")
        self.port = int(line.rsplit(":", 1)[1])
        wait_healthy(self.address)
        return self

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)


@pytest.fixture
def spawn_node(tmp_path) -> Iterator:
    procs: list[NodeProcess] = []

    def start(name: str | None = None, extra: list[str] | None = None) -> NodeProcess:
        node = NodeProcess(str(tmp_path / (name or f"proc{len(procs)}")), extra=extra or [])
        procs.append(node)
        return node.start()

    yield start
    for node in procs:
        node.kill()
