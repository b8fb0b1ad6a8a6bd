"""Background work a flush waits for: futures tracked until done (write-behind, edge copies,
read repair all hand work to a thread and let callers wait for what was started so far)."""

from __future__ import annotations

import threading
from concurrent.futures import Future


class Pending:
    """A set of futures, each forgotten when it finishes; ``flush`` waits for those started."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._futures: set[Future] = set()

    def track(self, future: Future) -> Future:
        with self._lock:
            self._futures.add(future)
        future.add_done_callback(self._forget)
        return future

    def _forget(self, future: Future) -> None:
        with self._lock:
            self._futures.discard(future)

    def flush(self, timeout: float | None = None) -> None:
        """Wait for every future tracked so far (each raises what its work raised)."""
        with self._lock:
            pending = list(self._futures)
        for future in pending:
            future.result(timeout)
