"""Membership: the ring, the replication factor and write quorum, the cluster file, down nodes.

One job: which nodes own a key, healthy ones first. Owners are cached per ring position
(a block's layer records share one) so that a request's lookup and read passes resolve each
block once; the cache dies with the ring when the cluster file changes.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence

from .cluster import MAX_REPLICATION, ClusterSpec, check_address, parse_nodes
from .ring import DEFAULT_VNODES, HashRing, key_position

log = logging.getLogger(__name__)

DOWN_SECONDS = 1.0  # after a node fails, try it last for this long
CHECK_SECONDS = 1.0  # the cluster file is looked at most this often
OWNER_CACHE = 1 << 16


class Membership:
    def __init__(self, nodes: Sequence[str] | str, replication: int, vnodes: int = DEFAULT_VNODES,
                 write_quorum: int = 1, stripe: bool = True) -> None:
        self.cluster_file: str | None = None
        if isinstance(nodes, str):
            spec_text = nodes
            cluster, nodes = parse_nodes(spec_text)
            if cluster is not None:  # the file is the source of truth for the cluster's shape
                self.cluster_file = os.path.abspath(spec_text)
                replication, vnodes = cluster.replication, cluster.vnodes
        else:
            nodes = [check_address(n) for n in nodes]
        if isinstance(replication, bool) or not isinstance(replication, int) or not 1 <= replication <= MAX_REPLICATION:
            raise ValueError(f"replication must be an integer from 1 to {MAX_REPLICATION}, got {replication!r}")
        if isinstance(write_quorum, bool) or not isinstance(write_quorum, int) or write_quorum < 1:
            raise ValueError(f"write_quorum must be a positive integer, got {write_quorum!r}")
        self._requested_quorum = write_quorum
        self.stripe = stripe
        self._lock = threading.Lock()
        self._down_until: dict[str, float] = {}
        self._set_ring(HashRing(nodes, vnodes), replication)
        self._file_mtime = os.stat(self.cluster_file).st_mtime_ns if self.cluster_file else 0
        self._bad_mtime = 0  # a cluster file version already refused (logged once)
        self._checked_at = time.monotonic()

    def _set_ring(self, ring: HashRing, replication: int) -> None:
        with self._lock:
            self.ring = ring
            self.replication = min(replication, len(ring.nodes))
            self.write_quorum = min(self._requested_quorum, self.replication)
            self._owners: dict[int, tuple[str, ...]] = {}

    def refresh(self, force: bool = False) -> bool:
        """Reload the cluster file if it changed (checked at most once a second). A file that
        does not pass its checks leaves the current ring in place, with one log line per version."""
        if not self.cluster_file or (not force and time.monotonic() - self._checked_at < CHECK_SECONDS):
            return False
        self._checked_at = time.monotonic()
        mtime = 0
        try:
            mtime = os.stat(self.cluster_file).st_mtime_ns
            if (mtime == self._file_mtime or mtime == self._bad_mtime) and not force:
                return False
            spec = ClusterSpec.load(self.cluster_file)
        except (OSError, ValueError) as exc:
            if mtime != self._bad_mtime or force:
                log.warning("keeping the current ring (%d nodes): %s", len(self.ring.nodes), exc)
            self._bad_mtime = mtime
            return False
        self._file_mtime = mtime
        self._set_ring(HashRing(spec.nodes, spec.vnodes), spec.replication)
        log.info("cluster file reloaded: %d nodes, replication %d", len(spec.nodes), spec.replication)
        return True

    def owners(self, key: bytes) -> tuple[str, ...]:
        """The key's `replication` owners in ring order (cached per position)."""
        position = key_position(key)
        found = self._owners.get(position)
        if found is None:
            found = tuple(self.ring.owners(key, self.replication))
            if len(self._owners) >= OWNER_CACHE:
                self._owners.clear()
            self._owners[position] = found
        return found

    def replicas(self, key: bytes, stripe: int = 0) -> list[str]:
        """Owners of a key, healthy ones first; `stripe` rotates them so that a batch's reads
        spread over all replicas (striped fetch) instead of all hitting the primaries."""
        owners = list(self.owners(key))
        if self.stripe and len(owners) > 1:
            shift = stripe % len(owners)
            owners = owners[shift:] + owners[:shift]
        now = time.monotonic()
        return sorted(owners, key=lambda n: self._down_until.get(n, 0.0) > now)

    def routes(self, keys: Sequence[bytes]) -> list[list[str]]:
        """Replica order of every key of one request (computed once, used by every pass)."""
        return [self.replicas(key, i) for i, key in enumerate(keys)]

    def is_down(self, node: str) -> bool:
        """Whether `node` failed (or stayed silent) within the last DOWN_SECONDS."""
        return self._down_until.get(node, 0.0) > time.monotonic()

    def mark_down(self, node: str) -> None:
        self._down_until[node] = time.monotonic() + DOWN_SECONDS

    def close(self) -> None:
        """Nothing to stop here (the etcd-backed membership stops its watch)."""
