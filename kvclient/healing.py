"""Healing: hinted handoff for writes a replica missed, and rebalancing after membership changes.

Read repair lives in the client's read path (a replica that answered missing or corrupt while a
later one had the record gets it written back). Hints cover the other case: a write or delete
acknowledged by the quorum while one owner was down is kept here, in memory and bounded, and
delivered when that node answers again. Deletes also leave durable tombstones
(``kvclient.tombstones``) that the repair pass below applies, whoever made them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from kvproto.errors import KVCacheError
from kvproto.hints import is_hint

from .tombstones import deleted_key, tombstone_key

log = logging.getLogger(__name__)


class HintQueue:
    """Writes and deletes owed to unreachable nodes, delivered by a background thread.

    A queued value of None is a delete. While a node owes a key's delete, this client does not
    read that key from it (``owes_delete``), so a replica that comes back with a deleted record
    never serves it; ``on_deleted(keys)`` is told when no node owes those deletes any more."""

    def __init__(self, deliver: Callable[[str, list[tuple[bytes, bytes]]], None],
                 max_bytes: int = 256 << 20, interval: float = 0.5,
                 deliver_delete: Callable[[str, list[bytes]], None] | None = None,
                 on_deleted: Callable[[list[bytes]], None] | None = None) -> None:
        self._deliver = deliver
        self._deliver_delete = deliver_delete
        self._on_deleted = on_deleted
        self._hints: dict[str, OrderedDict[bytes, bytes | None]] = {}
        self._deletes = 0  # queued deletes, all nodes (a lock-free "none" for the read path)
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
                    if queue[key] is not None:
                        continue
                    del queue[key]  # a write after a delete: the write is owed now
                    self._deletes -= 1
                if self._bytes + len(value) > self.max_bytes:
                    self.dropped += 1  # read repair and the repair pass still heal it later
                    continue
                queue[key] = bytes(value)
                self._bytes += len(value)
            self._cond.notify()

    def add_delete(self, node: str, keys: Sequence[bytes]) -> None:
        with self._cond:
            queue = self._hints.setdefault(node, OrderedDict())
            for key in keys:
                old = queue.pop(key, b"")
                if old is None:
                    self._deletes -= 1
                else:
                    self._bytes -= len(old)
                queue[key] = None
                self._deletes += 1
            self._cond.notify()

    def has_deletes(self) -> bool:
        return self._deletes > 0

    def owes_delete(self, node: str, key: bytes) -> bool:
        queue = self._hints.get(node)
        return queue is not None and key in queue and queue.get(key, b"") is None

    def cancel_deletes(self, keys: Sequence[bytes]) -> list[bytes]:
        """Forget queued deletes of `keys` (they are being written again); the ones dropped."""
        dropped: list[bytes] = []
        with self._cond:
            for queue in self._hints.values():
                for key in keys:
                    if key in queue and queue[key] is None:
                        del queue[key]
                        self._deletes -= 1
                        dropped.append(key)
        return list(dict.fromkeys(dropped))

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
                writes = [(k, v) for k, v in batch if v is not None]
                deletes = [k for k, v in batch if v is None]
                try:
                    if writes:
                        self._deliver(node, writes)
                    if deletes and self._deliver_delete is not None:
                        self._deliver_delete(node, deletes)
                except KVCacheError as exc:
                    log.debug("hints for %s not delivered yet: %s", node, exc)
                    break
                with self._cond:
                    queue = self._hints.get(node, OrderedDict())
                    for key, value in batch:
                        if key in queue and queue[key] is value:
                            del queue[key]
                            if value is None:
                                self._deletes -= 1
                            else:
                                self._bytes -= len(value)
                    settled = [k for k in deletes
                               if not any(q.get(k, b"") is None for q in self._hints.values())]
                if settled and self._on_deleted is not None:
                    self._on_deleted(settled)
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
    deleted: int = 0   # stale copies of deleted keys removed (tombstones applied)
    failed: int = 0    # keys that could not be read from any holder, or not written
    unreachable: list[str] = field(default_factory=list)  # nodes that could not be scanned
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed and not self.unreachable

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


def _chunks(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def rebalance(client, previous_nodes: Sequence[str], prune: bool = False, batch: int = 64) -> RebalanceReport:
    """Copy every key to the owners the client's ring gives it that lack it; optionally prune.

    Only keys whose owner set changed (or that lost a copy) are touched, so a join or leave
    moves about K/N records. Tombstones are applied, never copied: a deleted key's stale copies
    are removed, and its tombstones too once every owner answered. With `previous_nodes` equal
    to the ring's nodes this is the anti-entropy pass (``Client.repair``).
    """
    started = time.monotonic()
    report = RebalanceReport()
    nodes = list(dict.fromkeys([*previous_nodes, *client.ring.nodes]))
    holders: dict[bytes, set[str]] = defaultdict(set)
    tombs: dict[bytes, set[str]] = defaultdict(set)  # deleted key -> nodes holding its tombstone
    for node in nodes:
        try:
            for key in _scan_all(client.conn(node), client.timeout):
                deleted = deleted_key(key)
                if deleted is not None:
                    tombs[deleted].add(node)
                elif not is_hint(key):  # a node's own record of a write owed elsewhere (kvstore.hints)
                    holders[key].add(node)
        except KVCacheError as exc:
            log.warning("cannot scan %s: %s", node, exc)
            report.unreachable.append(node)
    report.scanned = len(holders)
    _apply_tombstones(client, holders, tombs, report)
    plan: dict[str, list[tuple[bytes, list[str]]]] = defaultdict(list)  # source -> (key, targets)
    stale: dict[str, list[bytes]] = defaultdict(list)
    for key, have in holders.items():
        if key in tombs:
            continue
        want = client.ring.owners(key, client.replication)
        missing = [n for n in want if n not in have and n not in report.unreachable]
        if missing:
            report.moved += 1
            source = next((n for n in want if n in have), sorted(have)[0])
            plan[source].append((key, missing))
        if prune:
            for node in have.difference(want):
                stale[node].append(key)
    for source, entries in plan.items():
        for chunk in _chunks(entries, batch):
            out: dict[str, list[tuple[bytes, bytes]]] = defaultdict(list)
            try:
                values = list(client.conn(source).get([k for k, _ in chunk], client.stream_timeout))
            except KVCacheError as exc:
                log.warning("cannot read %d keys from %s: %s", len(chunk), source, exc)
                report.failed += len(chunk)
                continue
            for (key, targets), (_, value, _corrupt) in zip(chunk, values):
                if value is None:
                    report.failed += 1
                    continue
                for target in targets:
                    out[target].append((key, value))
            for target, items in out.items():
                try:
                    client.conn(target).put(items, client.stream_timeout)
                    report.copies += len(items)
                except KVCacheError as exc:
                    log.warning("cannot copy %d keys to %s: %s", len(items), target, exc)
                    report.failed += len(items)
    for node, keys in stale.items():
        for chunk in _chunks(keys, 1000):
            report.pruned += client.conn(node).delete(chunk, client.timeout)
    report.seconds = round(time.monotonic() - started, 3)
    return report


def _apply_tombstones(client, holders: dict[bytes, set[str]], tombs: dict[bytes, set[str]],
                      report: RebalanceReport) -> None:
    """Delete the stale copies of tombstoned keys; drop a tombstone once no owner holds the key."""
    doomed: dict[str, list[bytes]] = defaultdict(list)
    for key in tombs:
        for node in holders.get(key, ()):
            doomed[node].append(key)
    failed: set[bytes] = set()
    for node, keys in doomed.items():
        for chunk in _chunks(keys, 1000):
            try:
                report.deleted += client.conn(node).delete(chunk, client.timeout)
            except KVCacheError as exc:
                log.warning("cannot delete %d stale keys on %s: %s", len(chunk), node, exc)
                failed.update(chunk)
                report.failed += len(chunk)
    if report.unreachable:
        return  # an owner we could not scan may still hold a copy: keep every tombstone
    cleared: dict[str, list[bytes]] = defaultdict(list)
    for key, where in tombs.items():
        if key not in failed:
            for node in where:
                cleared[node].append(tombstone_key(key))
    for node, keys in cleared.items():
        for chunk in _chunks(keys, 1000):
            try:
                client.conn(node).delete(chunk, client.timeout)
            except KVCacheError as exc:
                log.info("tombstones on %s kept: %s", node, exc)
