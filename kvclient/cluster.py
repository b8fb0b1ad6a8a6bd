"""Membership: the cluster file read by nodes and clients, node addresses, and their checks.

A cluster file is JSON: {"nodes": ["host:port", ...], "replication": 2, "vnodes": 128}.
Adding or removing a node is an edit of this file plus `kvctl rebalance`; clients reload it on
their next call after its modification time changes. Every field is checked (type and range)
with a one-line ValueError that names the file and the field.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

from .ring import DEFAULT_VNODES, MAX_VNODES

MAX_REPLICATION = 16


def check_address(address: str, where: str = "") -> str:
    """`address` as HOST:PORT, or a ValueError saying what is wrong with it and what to write."""
    where = f"{where}: " if where else ""
    if not isinstance(address, str) or not address.strip():
        raise ValueError(f"{where}a node address must be a non-empty HOST:PORT string, got {address!r}")
    address = address.strip()
    if "://" in address:
        scheme, rest = address.split("://", 1)
        raise ValueError(f"{where}node {address!r}: no URL scheme ({scheme}://) — write HOST:PORT, "
                         f"e.g. {rest.rstrip('/')}")
    host, sep, port = address.rpartition(":")
    if not sep or not host or host.endswith(":") and not host.startswith("["):
        raise ValueError(f"{where}node {address!r} has no port — write HOST:PORT, e.g. {address}:7070")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{where}node {address!r}: port {port!r} is not a number from 1 to 65535")
    return address


def _integer(data: dict, name: str, default: int, low: int, high: int, path: str) -> int:
    value = data.get(name, default)
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"cluster file {path}: {name!r} must be an integer, got {json.dumps(value)}")
    if not low <= value <= high:
        raise ValueError(f"cluster file {path}: {name!r} must be from {low} to {high}, got {value}")
    return value


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
        except UnicodeDecodeError as exc:
            raise ValueError(f"cluster file {path}: not UTF-8 text") from exc
        if not isinstance(data, dict):
            raise ValueError(f"cluster file {path}: must be a JSON object with 'nodes'")
        nodes = data.get("nodes")
        if not isinstance(nodes, list) or not nodes:
            raise ValueError(f"cluster file {path}: 'nodes' must be a non-empty list of HOST:PORT")
        checked = tuple(check_address(n, f"cluster file {path}") for n in nodes)
        replication = _integer(data, "replication", 2, 1, MAX_REPLICATION, path)
        vnodes = _integer(data, "vnodes", DEFAULT_VNODES, 1, MAX_VNODES, path)
        return cls(checked, replication, vnodes)

    def save(self, path: str) -> None:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump({"nodes": list(self.nodes), "replication": self.replication, "vnodes": self.vnodes}, f, indent=2)
        os.replace(tmp, path)  # readers never see half a file


def _looks_like_a_path(spec: str) -> bool:
    return "://" not in spec and "," not in spec and (
        spec.endswith((".json", ".yaml", ".yml")) or os.sep in spec or spec.startswith("."))


def parse_nodes(spec: str) -> tuple[ClusterSpec | None, list[str]]:
    """`spec` is a cluster file path or a comma-separated HOST:PORT list (each checked)."""
    if os.path.isfile(spec):
        cluster = ClusterSpec.load(spec)
        return cluster, list(cluster.nodes)
    if _looks_like_a_path(spec):
        raise ValueError(f"cluster file {spec} does not exist (or give nodes as HOST:PORT,HOST:PORT)")
    nodes = [n.strip() for n in spec.split(",") if n.strip()]
    if not nodes:
        raise ValueError("no nodes given (HOST:PORT,HOST:PORT or a cluster file)")
    return None, [check_address(n) for n in nodes]
