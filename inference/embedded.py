"""A throwaway cluster inside this process: N kvstore nodes on loopback, temp LMDB dirs, one Client."""

from __future__ import annotations

import shutil
import tempfile
from typing import Any

from kvclient import Client
from kvstore.config import ServerConfig
from kvstore.server import Node, build_node


class EmbeddedCluster:
    """`with EmbeddedCluster(2, replication=2) as client: ...` (for demos, the CLI and tests)."""

    def __init__(self, nodes: int = 2, replication: int = 2, map_size_gb: float = 4.0) -> None:
        if nodes < 1:
            raise ValueError("an embedded cluster needs at least one node")
        self.size = nodes
        self.replication = replication
        self.map_size_gb = map_size_gb
        self.nodes: list[Node] = []
        self.client: Client | None = None
        self._dir: str | None = None

    @property
    def addresses(self) -> list[str]:
        return [f"127.0.0.1:{node.port}" for node in self.nodes]

    def start(self) -> Client:
        self._dir = tempfile.mkdtemp(prefix="kvinfer-")
        try:
            for i in range(self.size):
                config = ServerConfig(
                    listen="127.0.0.1:0", data_dir=f"{self._dir}/node{i}", map_size_gb=self.map_size_gb,
                    sync=False, node_id=f"embedded-{i}",
                )
                self.nodes.append(build_node(config))
            self.client = Client(self.addresses, replication=self.replication)
        except BaseException:
            self.stop()
            raise
        return self.client

    def stop(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        for node in self.nodes:
            node.stop(0)
        self.nodes = []
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> Client:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
