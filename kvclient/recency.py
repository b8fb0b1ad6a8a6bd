"""Recency touches of co-located hits, batched: one Lookup per node per interval, not per request.

A read served from a node's memory map never reaches the node, so the client tells it which
blocks were used (a Lookup refreshes their LRU entry). One RPC per request cost a short load as
much as its copying (a Python gRPC call is ~0.2 ms of this process's CPU and the node's), so
touches are gathered and sent from one background thread every `interval` seconds, or sooner
once `max_keys` are waiting. The node's own LRU flush is coarser than that anyway.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence


class TouchBatcher:
    def __init__(self, send: Callable[[str, list[bytes]], None], interval: float = 0.2, max_keys: int = 4096) -> None:
        self.send, self.interval, self.max_keys = send, interval, max_keys
        self._pending: dict[str, dict[bytes, None]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False

    def add(self, node: str, keys: Sequence[bytes]) -> None:
        with self._lock:
            if self._closed:
                return
            waiting = self._pending.setdefault(node, {})
            waiting.update(dict.fromkeys(keys))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="kvclient-touch", daemon=True)
                self._thread.start()
            if len(waiting) >= self.max_keys:
                self._wake.set()

    def flush(self) -> None:
        with self._lock:
            batch, self._pending = self._pending, {}
        for node, keys in batch.items():
            self.send(node, list(keys))

    def _run(self) -> None:
        while True:
            self._wake.wait(self.interval)
            self._wake.clear()
            self.flush()
            with self._lock:
                if self._closed:
                    return

    def close(self) -> None:
        """Send what is waiting and stop the thread."""
        with self._lock:
            self._closed = True
            thread = self._thread
        self._wake.set()
        if thread is not None:
            thread.join(timeout=10)
        self.flush()
