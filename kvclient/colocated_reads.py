"""Co-located readers: one per same-host node, attached on first use, with a lock of their own.

One job: which nodes of a request can be read through their LMDB map, and those reads. The
cluster logic (ring, replicas, gRPC) stays in ``membership`` and ``replicas``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence

from kvproto.errors import KVCacheError
from kvproto.store import Sink

from .colocated import ColocatedReader
from .node import NodeConnection

RETRY_SECONDS = 5.0

log = logging.getLogger(__name__)


class ColocatedReaders:
    """Attach is once per node, under that node's own lock: concurrent first reads wait for the
    one attach in flight (at most `attach_wait` seconds, then they read over gRPC) instead of
    racing to open the same LMDB environment. A working reader is replaced only when its files
    changed, never by the None of a failed second attach."""

    def __init__(self, conn: Callable[[str], NodeConnection], timeout: float, verify: bool = True,
                 attach_wait: float | None = None) -> None:
        self._conn = conn
        self.timeout = timeout
        self.verify = verify
        self.attach_wait = attach_wait if attach_wait is not None else min(0.25 * timeout, 1.0)
        self._lock = threading.Lock()
        self._readers: dict[str, ColocatedReader | None] = {}
        self._attaching: dict[str, threading.Event] = {}  # node -> set when its attach ended
        self.on_read: Callable[[str, list], None] | None = None  # (node, batch) after each co-located batch
        self._retry_at: dict[str, float] = {}  # node -> when to ask a node that did not answer again
        self._closed = False

    def reader(self, node: str) -> ColocatedReader | None:
        """The node's co-located reader, attached on first use; None where it is unsafe (or the
        node has not answered yet)."""
        with self._lock:
            known = node in self._readers
            reader = self._readers.get(node)
            event = self._attaching.get(node)
            start = not known and event is None and time.monotonic() >= self._retry_at.get(node, 0.0)
            if start:
                event = self._attaching[node] = threading.Event()
        if start:
            threading.Thread(target=self._attach, args=(node, event), name=f"kv-attach-{node}", daemon=True).start()
        if not known:
            if event is None or not event.wait(self.attach_wait):
                return None
            with self._lock:
                reader = self._readers.get(node)
        if reader is not None and not reader.still_valid():
            log.info("co-located files of %s changed; back to gRPC", node)
            with self._lock:
                if self._readers.get(node) is reader:
                    self._readers[node] = None
            reader.close()
            return None
        return reader

    def _attach(self, node: str, event: threading.Event) -> None:
        """The one attach of `node` in flight (its own thread: a hung node delays no read)."""
        try:
            reader = ColocatedReader.attach(self._conn(node), self.timeout, self.verify)
        except KVCacheError as exc:  # a slow or restarting node is asked again, a little later
            log.info("co-located path not yet known for %s: %s", node, exc)
            with self._lock:
                self._retry_at[node] = time.monotonic() + RETRY_SECONDS
                del self._attaching[node]
            event.set()
            return
        with self._lock:
            if self._closed:
                stale, reader = reader, None
            else:
                stale = None
                self._readers[node] = reader
            del self._attaching[node]
        if stale is not None:
            stale.close()
        event.set()

    def attached(self) -> dict[str, bool]:
        """Which nodes have a co-located reader now (for operators and tests)."""
        with self._lock:
            return {node: reader is not None for node, reader in self._readers.items()}

    def groups(self, nodes: Sequence[str], orders: Sequence[Sequence[str]]
               ) -> tuple[dict[str, ColocatedReader], dict[str, list[int]], list[bool]]:
        """(usable readers, key indices per co-located node, whether all owners of a key are local).
        Only this request's owners are attached (and waited for)."""
        wanted = dict.fromkeys(n for owners in orders for n in owners)
        readers = {n: r for n in wanted if (r := self.reader(n)) is not None}
        local: dict[str, list[int]] = defaultdict(list)
        all_local = [False] * len(orders)
        if not readers:
            return readers, local, all_local
        for i, owners in enumerate(orders):
            node = next((n for n in owners if n in readers), None)
            if node is not None:
                local[node].append(i)
                all_local[i] = all(n in readers for n in owners)
        return readers, local, all_local

    def read_into(self, readers: dict[str, ColocatedReader], local: dict[str, list[int]], keys: Sequence[bytes],
                  sink: Sink, verify: bool, found: list[bool]) -> int:
        """Co-located keys to `sink`, one batch per node and read transaction; how many found."""
        count = 0
        for node, idx in local.items():
            with readers[node].views([keys[i] for i in idx], verify=verify) as views:
                batch = [(i, view, digest) for i, (view, digest) in zip(idx, views) if view is not None]
                if batch:
                    sink(batch)
                    if self.on_read is not None:
                        self.on_read(node, batch)  # metering: the node does not see this read
            for i, _, _ in batch:
                found[i] = True
            count += len(batch)
        return count

    def close(self) -> None:
        with self._lock:
            self._closed = True
            readers, self._readers = self._readers, {}
        for reader in readers.values():
            if reader is not None:
                reader.close()
