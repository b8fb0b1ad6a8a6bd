"""A throwaway cluster on loopback: N `kvstore serve` processes, temp LMDB dirs, one Client.

The nodes run in their own processes, as in production: a client on the same host then reads
their LMDB maps directly (the co-located fast path), which a node inside this very process would
forbid (LMDB allows one environment per process).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from typing import Any

from kvclient import Client
from kvstore.process import stop_process

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _NodeProcess:
    def __init__(self, data_dir: str, map_size_gb: float, node_id: str) -> None:
        argv = [sys.executable, "-m", "kvstore.cli", "serve", "--listen", "127.0.0.1:0", "--data", data_dir,
                "--map-size-gb", str(map_size_gb), "--no-sync", "--node-id", node_id, "--log-level", "WARNING"]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=env)
        line = self.proc.stdout.readline()  # the node prints its address once it is serving
        if "listening on" not in line:
            self.stop()
            raise RuntimeError(f"kvstore node did not start (exit code {self.proc.poll()})")
        self.address = line.split()[-1]

    def stop(self) -> None:
        stop_process(self.proc)


class EmbeddedCluster:
    """`with EmbeddedCluster(2, replication=2) as client: ...` (for demos, the CLI and tests)."""

    def __init__(self, nodes: int = 2, replication: int = 2, map_size_gb: float = 4.0) -> None:
        if nodes < 1:
            raise ValueError("an embedded cluster needs at least one node")
        self.size = nodes
        self.replication = replication
        self.map_size_gb = map_size_gb
        self.nodes: list[_NodeProcess] = []
        self.client: Client | None = None
        self._dir: str | None = None

    @property
    def addresses(self) -> list[str]:
        return [node.address for node in self.nodes]

    def start(self) -> Client:
        self._dir = tempfile.mkdtemp(prefix="kvinfer-")
        try:
            for i in range(self.size):
                self.nodes.append(_NodeProcess(f"{self._dir}/node{i}", self.map_size_gb, f"embedded-{i}"))
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
            node.stop()
        self.nodes = []
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> Client:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
