"""The edge tier (prefill CDN): blocks this host reads or writes end up on this host's node.

With membership from etcd each node names its host (``kvproto.host``); a client whose host runs
a ready node (``EtcdMembership.local_node``):
- reads that node first for every key (its map, co-located, when it holds the record);
- keeps what it read from a remote owner there as an **edge copy** (in the background, with the
  client's own token: the tenant's prefix, its quota and metering, like any write);
- puts what it writes there too when the ring placed both replicas elsewhere (placement: one
  copy next to the GPU that made it), beside the R owners.
Edge copies do not count toward replication (the quorum and the rebalancer look at ring
owners only) and the node evicts them before the records it owns (``kvstore.edge``); among
them the least recently used go first, so popularity decides what stays.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from kvproto.errors import KVCacheError
from kvproto.pending import Pending

log = logging.getLogger(__name__)

MAX_PENDING = 256 << 20  # bytes of edge copies waiting to be written; beyond it they are skipped


class EdgeTier:
    def __init__(self, membership, conn: Callable, timeout: float) -> None:
        self.membership = membership
        self._conn = conn
        self.timeout = timeout
        self.kept = 0  # records written as edge copies
        self.skipped = 0
        self._pending = 0
        self._lock = threading.Lock()
        self._futures = Pending()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="kvclient-edge")

    @property
    def local(self) -> str | None:
        return getattr(self.membership, "local_node", None)

    def read_orders(self, orders: list[list[str]]) -> list[list[str]]:
        local = self.local
        if local is None:
            return orders
        return [owners if owners and owners[0] == local else [local, *(n for n in owners if n != local)]
                for owners in orders]

    def keep(self, keys: Sequence[bytes], values: Sequence[bytes | None], indices: Sequence[int]) -> None:
        """Edge copies of what was just read from remote owners."""
        local = self.local
        if local is not None:
            self._write(local, [(keys[i], values[i]) for i in indices
                                if values[i] and local not in self.membership.owners(keys[i])])

    def place(self, items: Sequence[tuple[bytes, bytes | memoryview]]) -> None:
        """A copy of what this host writes on this host's node, where the ring put it elsewhere."""
        local = self.local
        if local is not None:
            self._write(local, [(k, bytes(v)) for k, v in items if local not in self.membership.owners(k)])

    def _write(self, node: str, items: list[tuple[bytes, bytes]]) -> None:
        if not items:
            return
        size = sum(len(v) for _, v in items)
        with self._lock:
            if self._pending + size > MAX_PENDING:
                self.skipped += len(items)
                return
            self._pending += size
        self._futures.track(self._pool.submit(self._put, node, items, size))

    def _put(self, node: str, items: list[tuple[bytes, bytes]], size: int) -> None:
        try:
            self._conn(node).put(items, self.timeout + size / 50e6)
            self.kept += len(items)
        except KVCacheError as exc:
            self.skipped += len(items)
            log.debug("edge copies not kept on %s: %s", node, exc)
        finally:
            with self._lock:
                self._pending -= size

    def flush(self, timeout: float | None = None) -> None:
        self._futures.flush(timeout)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
