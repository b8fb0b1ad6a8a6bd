"""Replica fan-out over gRPC: writes with a quorum and hints, reads with fallback and read repair.

Miss semantics (one rule for every call): any authoritative answer wins. A replica that answers
"present" or "found" settles a key; "missing" from a reachable replica is an answer too, so a
key is a miss when every replica either answered missing or was unreachable and at least one
answered. Only a key that no replica answered raises Unavailable. Writes and deletes succeed
when `write_quorum` replicas acknowledged each key; errors keep their cause and status code.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

from kvproto import record
from kvproto.errors import Corrupt, KVCacheError, Unavailable

from kvproto.store import Sink

from .healing import HintQueue
from .membership import Membership
from .node import Credentials, NodeConnection

log = logging.getLogger(__name__)


def by_rank(orders: Sequence[Sequence[str]], pending: Iterable[int], rank: int) -> dict[str, list[int]]:
    """Group keys by their `rank`-th replica (orders fixed once per request)."""
    work: dict[str, list[int]] = defaultdict(list)
    for i in pending:
        owners = orders[i]
        if rank < len(owners):
            work[owners[rank]].append(i)
    return work


class ReplicaSet:
    def __init__(self, membership: Membership, creds: Credentials, timeout: float, stream_timeout: float) -> None:
        self.membership = membership
        self.timeout = timeout
        self.stream_timeout = stream_timeout
        self._creds = creds
        self._conns: dict[str, NodeConnection] = {}
        self._lock = threading.Lock()
        self.repairs = 0
        self._repairing: set = set()  # read-repair futures not done yet (flush waits for them)
        self.hints = HintQueue(lambda node, items: self.conn(node).put(items, stream_timeout))
        self._pool = ThreadPoolExecutor(max_workers=max(4, 2 * len(membership.ring.nodes)),
                                        thread_name_prefix="kvclient")

    def conn(self, node: str) -> NodeConnection:
        with self._lock:
            if node not in self._conns:
                self._conns[node] = NodeConnection(node, self._creds)
            return self._conns[node]

    def fan_out(self, work: dict[str, list[int]], call: Callable, reads: bool = True) -> dict[str, object]:
        """Run call(node, indices) per node in parallel; a failure is returned, not raised.

        For reads, only failures another replica can cure (unreachable node, deadline, damaged
        bytes) are returned; a request the cluster refuses (bad key, auth) is raised at once.
        """
        if len(work) == 1:  # one node: no thread hop (it costs as much as a short read)
            [(node, idx)] = work.items()
            futures = {node: lambda: call(node, idx)}
        else:
            futures = {node: self._pool.submit(call, node, idx).result for node, idx in work.items()}
        results: dict[str, object] = {}
        for node, result in futures.items():
            try:
                results[node] = result()
            except KVCacheError as exc:
                if isinstance(exc, Unavailable):
                    self.membership.mark_down(node)
                elif reads and not isinstance(exc, Corrupt):
                    raise
                log.debug("node %s failed: %s", node, exc)
                results[node] = exc
        return results

    # ---- writes -------------------------------------------------------------------------
    def put_many(self, items: list[tuple[bytes, bytes | memoryview]]) -> None:
        digests = [record.digest(key, value) for key, value in items]  # once, for every replica
        work: dict[str, list[int]] = defaultdict(list)
        for i, (key, _) in enumerate(items):
            for node in self.membership.owners(key):
                work[node].append(i)
        size = sum(len(v) for _, v in items)
        timeout = self.timeout + size / 50e6  # allow 50 MB/s beyond the base deadline

        def send(node: str, idx: list[int]) -> None:
            self.conn(node).put([items[i] for i in idx], timeout, [digests[i] for i in idx])

        outcomes = self.fan_out(work, send, reads=False)
        for node, outcome in outcomes.items():
            if isinstance(outcome, Unavailable):  # owed to the node once it is back
                self.hints.add(node, [items[i] for i in work[node]])
        self._check_quorum(len(items), work, outcomes, "written")

    def delete(self, keys: list[bytes]) -> int:
        """Remove keys from every owner; raises when a key has fewer than `write_quorum` acks.
        Returns how many records the replicas removed in all."""
        work: dict[str, list[int]] = defaultdict(list)
        for i, key in enumerate(keys):
            for node in self.membership.owners(key):
                work[node].append(i)
        outcomes = self.fan_out(work, lambda n, idx: self.conn(n).delete([keys[i] for i in idx], self.timeout), False)
        self._check_quorum(len(keys), work, outcomes, "deleted")
        return sum(o for o in outcomes.values() if isinstance(o, int))

    def _check_quorum(self, count: int, work: dict[str, list[int]], outcomes: dict[str, object], done: str) -> None:
        acks = [0] * count
        errors = [o for o in outcomes.values() if isinstance(o, KVCacheError)]
        for node, outcome in outcomes.items():
            if not isinstance(outcome, KVCacheError):
                for i in work[node]:
                    acks[i] += 1
        short = sum(1 for a in acks if a < self.membership.write_quorum)
        if short:
            first = errors[0] if errors else Unavailable("no replica acknowledged")
            exc = type(first)(f"{short} of {count} records {done} below write quorum: {first}")
            exc.code = first.code
            raise exc from first

    # ---- reads --------------------------------------------------------------------------
    def _in_rank_order(self, orders: Sequence[Sequence[str]], indices: Iterable[int],
                       ask: Callable[[str, list[int], set[int]], None], settled: Callable[[int], bool]) -> None:
        """ask(node, key indices, answered) of each key's replicas in order, until settled(i);
        raise Unavailable for the keys no replica answered (the one miss rule of every read)."""
        pending = list(indices)
        answered: set[int] = set()
        last_error: KVCacheError | None = None
        rank = 0
        while pending and rank < max((len(orders[i]) for i in pending), default=0):
            work = by_rank(orders, pending, rank)
            for outcome in self.fan_out(work, lambda node, idx: ask(node, idx, answered)).values():
                if isinstance(outcome, KVCacheError):
                    last_error = outcome
            pending = [i for i in pending if not settled(i)]
            rank += 1
        unanswered = [i for i in pending if i not in answered]
        if unanswered:
            raise Unavailable(f"{len(unanswered)} keys: no replica answered") from last_error

    def fetch(self, keys: Sequence[bytes], orders: Sequence[Sequence[str]], indices: Iterable[int],
              results: list[bytes | None], sink: Sink | None = None) -> None:
        """Fill results[i] for `indices` from their replicas in order; raise Unavailable for any
        key that no replica answered; write back to replicas that lacked or damaged a record.

        With `sink`, each record goes to sink([(i, view, None)]) as it arrives instead (verified,
        one call at a time), received into a connection's reusable buffer: no fresh memory per
        record; results[i] then only marks what was found (b"")."""
        lacking: dict[int, list[str]] = defaultdict(list)  # replicas that answered missing/corrupt
        owed: dict[int, bytes] = {}  # what read repair writes back
        delivering = threading.Lock()

        def ask(node: str, idx: list[int], answered: set[int]) -> None:
            entries = self.conn(node).get([keys[i] for i in idx], self.stream_timeout, reuse=sink is not None)
            for j, value, corrupt in entries:
                i = idx[j]
                if value is None:
                    if not corrupt:
                        answered.add(i)  # "missing" is an answer; damaged bytes are not
                    lacking[i].append(node)
                    continue
                answered.add(i)
                if sink is None:
                    results[i] = value
                else:
                    with delivering:
                        sink([(i, memoryview(value), None)])
                    results[i] = b""
                if lacking.get(i):  # a replica before this one lacked it
                    owed[i] = value if sink is None else bytes(value)

        self._in_rank_order(orders, indices, ask, lambda i: results[i] is not None)
        self._read_repair(keys, owed, lacking)

    def present(self, keys: Sequence[bytes], orders: Sequence[Sequence[str]], indices: Iterable[int],
                present: list[bool]) -> None:
        """Set present[i] for `indices` by Lookup over their replicas (same miss rule as fetch)."""

        def ask(node: str, idx: list[int], answered: set[int]) -> None:
            for i, p in zip(idx, self.conn(node).lookup([keys[i] for i in idx], self.timeout)):
                present[i] = present[i] or p
                answered.add(i)

        self._in_rank_order(orders, indices, ask, lambda i: present[i])

    def _read_repair(self, keys: Sequence[bytes], owed_values: dict[int, bytes], lacking: dict[int, list[str]]) -> None:
        """Write records back to replicas that lacked them or held damaged copies (background)."""
        owed: dict[str, list[tuple[bytes, bytes]]] = defaultdict(list)
        for i, value in owed_values.items():
            for node in lacking[i]:
                owed[node].append((keys[i], value))
        for node, items in owed.items():
            self.repairs += len(items)
            future = self._pool.submit(self._repair_one, node, items)
            with self._lock:
                self._repairing.add(future)
            future.add_done_callback(self._repaired)

    def _repaired(self, future) -> None:
        with self._lock:
            self._repairing.discard(future)

    def flush(self, timeout: float | None = None) -> None:
        """Wait for the read repairs started so far (each is written or handed to the hints)."""
        with self._lock:
            pending = list(self._repairing)
        for future in pending:
            future.result(timeout)

    def _repair_one(self, node: str, items: list[tuple[bytes, bytes]]) -> None:
        try:
            self.conn(node).put(items, self.stream_timeout)
        except KVCacheError as exc:
            log.info("read repair of %d records on %s deferred: %s", len(items), node, exc)
            self.hints.add(node, items)

    def touch(self, node: str, keys: list[bytes]) -> None:
        """A Lookup that only refreshes the node's LRU entries (co-located hits)."""
        try:
            self.conn(node).lookup(keys, self.timeout)
        except KVCacheError as exc:
            log.debug("recency touch on %s failed: %s", node, exc)

    def close(self) -> None:
        self.hints.close()
        self._pool.shutdown(wait=True)
        for conn in self._conns.values():
            conn.close()
