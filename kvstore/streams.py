"""Streams that cannot starve a node: admission caps, and a watchdog that ends idle streams.

The node answers from one gRPC thread pool. A Put stream holds a thread while it waits for the
client's next message, a Get stream while the client does not read: a few idle streams would
hold every thread, and every other caller's Health, Stat and Get would wait. So:

- bulk streams (Put, Get) are admitted up to ``per_tenant`` per authenticated tenant,
  ``per_peer`` per client address and ``total`` in all; ``total`` stays below the pool's size,
  so the small unary calls (Health, Stat, Lookup, Delete, Scan) always find a thread. A stream
  over a cap is refused at once with RESOURCE_EXHAUSTED (the client reads another replica);
- a watchdog cancels a stream that made no progress (no message received, none taken by the
  client) for ``idle_seconds``: its thread and what it held are released.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import grpc

from kvproto.errors import KVCacheError, QuotaExceeded

log = logging.getLogger(__name__)

WATCH_SECONDS = 0.25


class StreamTimedOut(KVCacheError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


@dataclass
class Watch:
    """One admitted stream: its last sign of progress."""

    context: grpc.ServicerContext
    method: str
    last: float = field(default_factory=time.monotonic)
    timed_out: bool = False

    def beat(self) -> None:
        self.last = time.monotonic()


def peer_host(context: grpc.ServicerContext) -> str:
    """The client's address without its port ("ipv4:127.0.0.1:5000" -> "ipv4:127.0.0.1")."""
    peer = context.peer() or ""
    return peer.rsplit(":", 1)[0] if peer.count(":") >= 2 else peer


class StreamGuard:
    def __init__(self, total: int, per_tenant: int, per_peer: int, idle_seconds: float) -> None:
        self.total, self.per_tenant, self.per_peer = total, per_tenant, per_peer
        self.idle_seconds = idle_seconds
        self._lock = threading.Lock()
        self._tenants: Counter[bytes] = Counter()
        self._peers: Counter[str] = Counter()
        self._open: dict[int, Watch] = {}
        self.refused = Counter()  # why streams were refused: tenant / peer / total
        self.timed_out = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch_loop, name="kvstore-streams", daemon=True)
        self._thread.start()

    @contextmanager
    def admit(self, context: grpc.ServicerContext, method: str, tenant: bytes | None) -> Iterator[Watch]:
        """Hold a slot for one stream (tenant None: a node without auth, capped per peer)."""
        peer = peer_host(context)
        with self._lock:
            why = None
            if sum(self._peers.values()) >= self.total:
                why = ("total", f"the node serves {self.total} streams at most")
            elif tenant is not None and self._tenants[tenant] >= self.per_tenant:
                why = ("tenant", f"a tenant may hold {self.per_tenant} streams at once")
            elif self._peers[peer] >= self.per_peer:
                why = ("peer", f"one client address may hold {self.per_peer} streams at once")
            if why is not None:
                self.refused[why[0]] += 1
                raise QuotaExceeded(f"too many concurrent streams: {why[1]}; retry when one ends")
            self._peers[peer] += 1
            if tenant is not None:
                self._tenants[tenant] += 1
            watch = Watch(context, method)
            self._open[id(watch)] = watch
        try:
            yield watch
        except Exception:
            if watch.timed_out:
                raise StreamTimedOut(f"{method} stream idle for over {self.idle_seconds:g} s") from None
            raise
        finally:
            with self._lock:
                self._open.pop(id(watch), None)
                self._peers[peer] -= 1
                if not self._peers[peer]:
                    del self._peers[peer]
                if tenant is not None:
                    self._tenants[tenant] -= 1
                    if not self._tenants[tenant]:
                        del self._tenants[tenant]

    def open_streams(self) -> int:
        with self._lock:
            return len(self._open)

    def _watch_loop(self) -> None:
        while not self._stop.wait(WATCH_SECONDS):
            now = time.monotonic()
            with self._lock:
                idle = [w for w in self._open.values() if not w.timed_out and now - w.last > self.idle_seconds]
            for watch in idle:
                watch.timed_out = True
                self.timed_out += 1
                log.info("ending a %s stream from %s idle for %.0f s", watch.method, watch.context.peer(),
                         now - watch.last)
                watch.context.cancel()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
