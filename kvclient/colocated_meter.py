"""Metering of co-located reads: what a client read through a node's map, reported to that node.

A read through the map never reaches the node, so its meter (``kvstore.market``) would not see
it. The client counts, per node, the records and bytes it read there and the tokens of the
layer-0 block records among them (their KV header names the tokens), and sends them as one
``colocated`` meter entry per node from a background thread every ``interval`` seconds, under
its own token: the node charges the caller's tenant. An entry keeps its id until the node took
it, so a retried report counts once. What this trusts (docs/market.md): the reporting client,
which could under-report; on an auth node the map itself is opt-in (``--colocated on``), and a
tenant trusted with the map is trusted with its report. A report that cannot be delivered costs
a statistic (logged), never a read.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Callable

from kvproto.errors import KVCacheError
from kvproto.market import block_tokens
from kvproto.pb import kvcache_pb2 as pb

log = logging.getLogger(__name__)

MAX_WAITING = 64  # entries per node kept for a node that does not answer; older ones are dropped


class ColocatedMeter:
    def __init__(self, send: Callable[[str, list[pb.MeterEntry]], None], interval: float = 1.0) -> None:
        self.send, self.interval = send, interval
        self._counts: dict[str, list[int]] = {}  # node -> [records, bytes, tokens] not yet in an entry
        self._waiting: dict[str, list[pb.MeterEntry]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.reported = 0  # records the nodes took
        self.dropped = 0

    def add(self, node: str, batch) -> None:
        """Count one co-located batch [(index, view, digest)] read from `node`."""
        records = len(batch)
        nbytes = sum(len(view) for _, view, _ in batch)
        tokens = sum(block_tokens(view) for _, view, _ in batch)
        with self._lock:
            counts = self._counts.setdefault(node, [0, 0, 0])
            counts[0] += records
            counts[1] += nbytes
            counts[2] += tokens
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(target=self._run, name="kvclient-meter", daemon=True)
                self._thread.start()

    def flush(self) -> None:
        with self._lock:
            for node, (records, nbytes, tokens) in self._counts.items():
                if records:
                    entry = pb.MeterEntry(id=secrets.token_bytes(16), kind="colocated", records=records,
                                          bytes=nbytes, tokens=tokens)
                    self._waiting.setdefault(node, []).append(entry)
            self._counts = {}
            waiting, self._waiting = self._waiting, {}
        for node, entries in waiting.items():
            try:
                self.send(node, entries)
                self.reported += sum(e.records for e in entries)
            except KVCacheError as exc:  # kept (same ids) for the next round
                log.info("co-located reads not reported to %s yet: %s", node, exc)
                with self._lock:
                    kept = (self._waiting.setdefault(node, []) + entries)[-MAX_WAITING:]
                    self.dropped += len(self._waiting[node]) + len(entries) - len(kept)
                    self._waiting[node] = kept

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.flush()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.flush()
