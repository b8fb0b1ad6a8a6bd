"""Membership: the cluster file read by nodes and clients, and rebalancing after a change.

A cluster file is JSON: {"nodes": ["host:port", ...], "replication": 2, "vnodes": 128}.
Adding or removing a node is an edit of this file plus `kvctl rebalance`; clients reload it on
their next call after its modification time changes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from .ring import DEFAULT_VNODES


@dataclass(frozen=True)
class ClusterSpec:
    nodes: tuple[str, ...]
    replication: int = 2
    vnodes: int = DEFAULT_VNODES

    @classmethod
    def load(cls, path: str) -> "ClusterSpec":
        try:
            with open(path) as f:
                data = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"cluster file {path}: not JSON ({exc.msg}, line {exc.lineno})") from exc
        nodes = data.get("nodes") if isinstance(data, dict) else None
        if not nodes or not all(isinstance(n, str) and ":" in n for n in nodes):
            raise ValueError(f"cluster file {path}: 'nodes' must be a non-empty list of HOST:PORT")
        replication = int(data.get("replication", 2))
        vnodes = int(data.get("vnodes", DEFAULT_VNODES))
        if replication < 1 or vnodes < 1:
            raise ValueError(f"cluster file {path}: replication and vnodes must be >= 1")
        return cls(tuple(nodes), replication, vnodes)

    def save(self, path: str) -> None:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump({"nodes": list(self.nodes), "replication": self.replication, "vnodes": self.vnodes}, f, indent=2)
        os.replace(tmp, path)  # readers never see half a file


def parse_nodes(spec: str) -> tuple[ClusterSpec | None, list[str]]:
    """`spec` is a cluster file path or a comma-separated node list."""
    if os.path.isfile(spec):
        cluster = ClusterSpec.load(spec)
        return cluster, list(cluster.nodes)
    nodes = [n.strip() for n in spec.split(",") if n.strip()]
    if not nodes:
        raise ValueError("no nodes given")
    return None, nodes
