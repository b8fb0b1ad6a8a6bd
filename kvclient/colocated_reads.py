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
    def __init__(self, conn: Callable[[str], NodeConnection], timeout: float, verify: bool = True) -> None:
        self._conn = conn
        self.timeout = timeout
        self.verify = verify
        self._lock = threading.Lock()
        self._readers: dict[str, ColocatedReader | None] = {}
        self._retry_at: dict[str, float] = {}  # node -> when to ask a node that did not answer again

    def reader(self, node: str) -> ColocatedReader | None:
        """The node's co-located reader, attached on first use; None where it is unsafe."""
        with self._lock:
            known = node in self._readers
            reader = self._readers.get(node)
        if not known:
            if time.monotonic() < self._retry_at.get(node, 0.0):
                return None
            try:
                reader = ColocatedReader.attach(self._conn(node), self.timeout, self.verify)
            except KVCacheError as exc:  # a slow or restarting node is asked again, a little later
                log.info("co-located path not yet known for %s: %s", node, exc)
                self._retry_at[node] = time.monotonic() + RETRY_SECONDS
                return None
            with self._lock:
                if node in self._readers:  # another thread attached it first
                    if reader is not None:
                        reader.close()
                    reader = self._readers[node]
                else:
                    self._readers[node] = reader
        if reader is not None and not reader.still_valid():
            log.info("co-located files of %s changed; back to gRPC", node)
            with self._lock:
                self._readers[node] = None
            reader.close()
            return None
        return reader

    def groups(self, nodes: Sequence[str], orders: Sequence[Sequence[str]]
               ) -> tuple[dict[str, ColocatedReader], dict[str, list[int]], list[bool]]:
        """(usable readers, key indices per co-located node, whether all owners of a key are local)."""
        readers = {n: r for n in nodes if (r := self.reader(n)) is not None}
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
            for i, _, _ in batch:
                found[i] = True
            count += len(batch)
        return count

    def close(self) -> None:
        with self._lock:
            readers, self._readers = self._readers, {}
        for reader in readers.values():
            if reader is not None:
                reader.close()
