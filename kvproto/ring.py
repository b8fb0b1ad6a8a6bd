"""A pure consistent-hash ring with virtual nodes (no I/O, deterministic across processes).

A key's position is its first 8 bytes read as a big-endian uint64: block keys are SHA-256
outputs and already uniform, so every layer record of a block lands on the same nodes.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterable, Sequence

DEFAULT_VNODES = 128
MAX_VNODES = 4096  # 4096 points per node already spread keys within ~2%; more only costs memory


def key_position(key: bytes) -> int:
    if len(key) >= 8:
        return int.from_bytes(key[:8], "big")
    # short operator keys (kvctl) are hashed so they spread too
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big")


def _vnode_position(node: str, index: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{node}#{index}".encode()).digest()[:8], "big")


class HashRing:
    """Maps keys to an ordered list of distinct owner nodes."""

    def __init__(self, nodes: Iterable[str], vnodes: int = DEFAULT_VNODES) -> None:
        self.nodes: tuple[str, ...] = tuple(dict.fromkeys(nodes))
        if not self.nodes:
            raise ValueError("a ring needs at least one node")
        if isinstance(vnodes, bool) or not isinstance(vnodes, int) or not 0 < vnodes <= MAX_VNODES:
            raise ValueError(f"vnodes must be an integer from 1 to {MAX_VNODES}, got {vnodes!r}")
        self.vnodes = vnodes
        points = sorted((_vnode_position(n, i), n) for n in self.nodes for i in range(vnodes))
        self._positions = [p for p, _ in points]
        self._owners = [n for _, n in points]

    def owners(self, key: bytes, count: int = 1) -> list[str]:
        """The first `count` distinct nodes clockwise from the key's position."""
        count = min(count, len(self.nodes))
        start = bisect.bisect_right(self._positions, key_position(key))
        found: list[str] = []
        for step in range(len(self._owners)):
            node = self._owners[(start + step) % len(self._owners)]
            if node not in found:
                found.append(node)
                if len(found) == count:
                    break
        return found

    def primary(self, key: bytes) -> str:
        return self.owners(key, 1)[0]

    def with_nodes(self, nodes: Sequence[str]) -> "HashRing":
        return HashRing(nodes, self.vnodes)

    def __repr__(self) -> str:
        return f"HashRing({len(self.nodes)} nodes, {self.vnodes} vnodes)"
