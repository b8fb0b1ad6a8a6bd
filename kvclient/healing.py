"""Healing: hinted handoff for writes a replica missed, and rebalancing after membership changes.

Read repair lives in the client's read path (a replica that answered missing or corrupt while a
later one had the record gets it written back). Hints cover the other case: a write acknowledged
by the quorum while one owner was down is kept here, in memory and bounded, and delivered when
that node answers again.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kvproto.errors import KVCacheError

log = logging.getLogger(__name__)


class HintQueue:
    """Records owed to unreachable nodes, delivered by a background thread."""

    def __init__(self, deliver: Callable[[str, list[tuple[bytes, bytes]]], None],
                 max_bytes: int = 256 << 20, interval: float = 0.5) -> None:
        self._deliver = deliver
        self._hints: dict[str, OrderedDict[bytes, bytes]] = {}
        self._bytes = 0
        self.max_bytes = max_bytes
        self.dropped = 0
        self._cond = threading.Condition()
        self._stop = False
        self._interval = interval
        self._thread = threading.Thread(target=self._run, name="kvclient-hints", daemon=True)
        self._thread.start()

    def add(self, node: str, items: Sequence[tuple[bytes, bytes | memoryview]]) -> None:
        with self._cond:
            queue = self._hints.setdefault(node, OrderedDict())
            for key, value in items:
                if key in queue:
                    continue
                if self._bytes + len(value) > self.max_bytes:
                    self.dropped += 1  # read repair and rebalance still heal it later
                    continue
                queue[key] = bytes(value)
                self._bytes += len(value)
            self._cond.notify()

    def pending(self) -> int:
        with self._cond:
            return sum(len(q) for q in self._hints.values())

    def deliver_now(self) -> int:
        """Try every owed node once; returns how many records are still owed."""
        with self._cond:
            work = {node: list(q.items()) for node, q in self._hints.items() if q}
        for node, items in work.items():
            for start in range(0, len(items), 64):
                batch = items[start : start + 64]
                try:
                    self._deliver(node, batch)
                except KVCacheError as exc:
                    log.debug("hints for %s not delivered yet: %s", node, exc)
                    break
                with self._cond:
                    queue = self._hints.get(node, OrderedDict())
                    for key, value in batch:
                        if queue.pop(key, None) is not None:
                            self._bytes -= len(value)
        return self.pending()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait(self._interval)
                if self._stop:
                    return
                idle = not any(self._hints.values())
            if not idle:
                self.deliver_now()

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout=5)


@dataclass
class RebalanceReport:
    scanned: int = 0   # distinct keys seen across all nodes
    moved: int = 0     # keys that gained an owner they lacked (copied there)
    copies: int = 0    # records written
    pruned: int = 0    # records deleted from nodes that no longer own them
    failed: int = 0    # keys that could not be read from any holder

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _scan_all(conn, timeout: float) -> list[bytes]:
    keys: list[bytes] = []
    start = b""
    while True:
        page, more = conn.scan(start, 10_000, timeout)
        keys.extend(page)
        if not more or not page:
            return keys
        start = page[-1]


def rebalance(client, previous_nodes: Sequence[str], prune: bool = False, batch: int = 64) -> RebalanceReport:
    """Copy every key to the owners the client's ring gives it that lack it; optionally prune.

    Only keys whose owner set changed are touched, so a join or leave moves about K/N records.
    """
    from collections import defaultdict

    report = RebalanceReport()
    nodes = list(dict.fromkeys([*previous_nodes, *client.ring.nodes]))
    holders: dict[bytes, set[str]] = defaultdict(set)
    for node in nodes:
        try:
            for key in _scan_all(client.conn(node), client.timeout):
                holders[key].add(node)
        except KVCacheError as exc:
            log.warning("cannot scan %s: %s", node, exc)
    report.scanned = len(holders)
    plan: dict[str, list[tuple[bytes, list[str]]]] = defaultdict(list)  # source -> (key, targets)
    stale: dict[str, list[bytes]] = defaultdict(list)
    for key, have in holders.items():
        want = client.ring.owners(key, client.replication)
        missing = [n for n in want if n not in have]
        if missing:
            report.moved += 1
            source = next((n for n in want if n in have), sorted(have)[0])
            plan[source].append((key, missing))
        if prune:
            for node in have.difference(want):
                stale[node].append(key)
    for source, entries in plan.items():
        for start in range(0, len(entries), batch):
            chunk = entries[start : start + batch]
            out: dict[str, list[tuple[bytes, bytes]]] = defaultdict(list)
            values = list(client.conn(source).get([k for k, _ in chunk], client.stream_timeout))
            for (key, targets), (_, value, _corrupt) in zip(chunk, values):
                if value is None:
                    report.failed += 1
                    continue
                for target in targets:
                    out[target].append((key, value))
            for target, items in out.items():
                client.conn(target).put(items, client.stream_timeout)
                report.copies += len(items)
    for node, keys in stale.items():
        for start in range(0, len(keys), 1000):
            report.pruned += client.conn(node).delete(keys[start : start + 1000], client.timeout)
    return report
