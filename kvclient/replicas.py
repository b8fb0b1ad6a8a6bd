"""Replica fan-out over gRPC: writes with a quorum and hints, reads with hedging and read repair.

Miss semantics (one rule for every call): any authoritative answer wins. A replica that answers
"present" or "found" settles a key; "missing" from a reachable replica is an answer too, so a
key is a miss when every replica either answered missing or was unreachable and at least one
answered. Only a key that no replica answered raises Unavailable. Writes and deletes succeed
when `write_quorum` replicas acknowledged each key; errors keep their cause and status code.

Deadlines: every call is bounded end to end by `timeout` (a write: plus its size at 50 MB/s).
A read whose replica gave no sign of life within `hedge_after` seconds is also sent to the next
replica; the first answer wins. Each node has its own few threads (``per_node``), so a hung
node holds only its own: reads of keys it does not own never wait behind it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait

from kvproto import record
from kvproto.errors import KVCacheError, Unavailable
from kvproto.pending import Pending
from kvproto.store import Sink

from .durable_hints import leave_hints
from .healing import HintQueue
from .hedged import Attempt, Read, in_rank_order
from .membership import Membership
from .node import Credentials, NodeConnection
from .tombstones import VALUE as TOMBSTONE, tombstone_key

log = logging.getLogger(__name__)

PER_NODE_CALLS = 8  # concurrent calls to one node from one client


def by_rank(orders: Sequence[Sequence[str]], pending: Iterable[int], rank: int) -> dict[str, list[int]]:
    """Group keys by their `rank`-th replica (orders fixed once per request)."""
    work: dict[str, list[int]] = defaultdict(list)
    for i in pending:
        owners = orders[i]
        if rank < len(owners):
            work[owners[rank]].append(i)
    return work


def _check_bytes(items: Sequence[tuple[bytes, object]]) -> None:
    for key, value in items:
        if not isinstance(key, bytes):
            raise TypeError(f"keys are bytes, got {type(key).__name__} ({key!r:.40})")
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise TypeError(f"values are bytes, bytearray or memoryview, got {type(value).__name__} for key "
                            f"{key!r:.40} (encode text first, e.g. value.encode())")


class ReplicaSet:
    def __init__(self, membership: Membership, creds: Credentials, timeout: float, stream_timeout: float,
                 hedge_after: float | None = None, per_node: int = PER_NODE_CALLS) -> None:
        self.membership = membership
        self.timeout = timeout
        self.stream_timeout = stream_timeout  # background transfers: hints, repairs, rebalance
        self.hedge_after = hedge_after if hedge_after is not None else min(0.25 * timeout, 1.0)
        self.per_node = per_node
        self._creds = creds
        self._conns: dict[str, NodeConnection] = {}
        self._pools: dict[str, ThreadPoolExecutor] = {}
        self._lock = threading.Lock()
        self.repairs = 0
        self.hedged = 0  # reads sent to a further replica because the first was silent
        self._repairing = Pending()  # read repairs not done yet (flush waits for them)
        self.hints = HintQueue(self._deliver_hint, deliver_delete=self._deliver_delete,
                               on_deleted=self._drop_tombstones)

    def conn(self, node: str) -> NodeConnection:
        with self._lock:
            if node not in self._conns:
                self._conns[node] = NodeConnection(node, self._creds)
            return self._conns[node]

    def _submit(self, node: str, fn: Callable, *args) -> Future:
        """Run fn on the node's own threads (a hung node fills only its own)."""
        with self._lock:
            pool = self._pools.get(node)
            if pool is None:
                pool = self._pools[node] = ThreadPoolExecutor(self.per_node, thread_name_prefix=f"kv-{node}")
        return pool.submit(fn, *args)

    @staticmethod
    def _left(node: str, deadline: float) -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise Unavailable(f"{node}: DEADLINE_EXCEEDED: no time left after waiting for this node's "
                              f"earlier calls (it may be hung)")
        return left

    def _write_fan_out(self, work: dict[str, list[int]], call: Callable[[str, list[int], float], object],
                       deadline: float) -> dict[str, object]:
        """call(node, indices, seconds left) on every node in parallel, bounded by `deadline`;
        failures are returned, not raised (the quorum rule judges them)."""
        down = {node for node in work if self.membership.is_down(node)}
        futures = {node: self._submit(node, lambda n, i: call(n, i, self._left(n, deadline)), node, idx)
                   for node, idx in work.items()}
        wait([f for n, f in futures.items() if n not in down], timeout=max(0.0, deadline - time.monotonic()) + 0.05)
        if down:  # a node that just failed gets a short grace once the others made the quorum
            acks: dict[int, int] = defaultdict(int)
            for node, future in futures.items():
                if node not in down and future.done() and future.exception() is None:
                    for i in work[node]:
                        acks[i] += 1
            quorum = all(acks[i] >= self.membership.write_quorum for idx in work.values() for i in idx)
            left = max(0.0, deadline - time.monotonic())
            wait([futures[n] for n in down], timeout=min(self.hedge_after, left) if quorum else left + 0.05)
        results: dict[str, object] = {}
        for node, future in futures.items():
            if not future.done():
                waited = f"{self.hedge_after:g} s (it failed just before)" if node in down else f"{self.timeout:g} s"
                outcome: object = Unavailable(f"{node}: DEADLINE_EXCEEDED: no answer within {waited} "
                                              f"(is the node hung?)")
            else:
                outcome = future.exception() or future.result()
                if isinstance(outcome, BaseException) and not isinstance(outcome, KVCacheError):
                    raise outcome
            if isinstance(outcome, Unavailable):
                self.membership.mark_down(node)
            results[node] = outcome
        return results

    # ---- writes -------------------------------------------------------------------------
    def put_many(self, items: list[tuple[bytes, bytes | memoryview]]) -> dict[str, object]:
        """Write every record to its owners; raise below the write quorum. Returns each node's
        outcome (a PutResponse, or the error that a hint now covers)."""
        _check_bytes(items)
        if self.hints.has_deletes():  # written again: no longer owed as deletes
            cancelled = self.hints.cancel_deletes([k for k, _ in items])
            if cancelled:
                self._drop_tombstones(cancelled)
        digests = [record.digest(key, value) for key, value in items]  # once, for every replica
        work: dict[str, list[int]] = defaultdict(list)
        for i, (key, _) in enumerate(items):
            for node in self.membership.owners(key):
                work[node].append(i)
        size = sum(len(v) for _, v in items)
        deadline = time.monotonic() + self.timeout + size / 50e6  # 50 MB/s beyond the base deadline

        def send(node: str, idx: list[int], left: float) -> object:
            return self.conn(node).put([items[i] for i in idx], left, [digests[i] for i in idx])

        outcomes = self._write_fan_out(work, send, deadline)
        for node, outcome in outcomes.items():
            if isinstance(outcome, Unavailable):  # owed to the node once it is back
                self.hints.add(node, [items[i] for i in work[node]])
                leave_hints(self.conn, self.timeout, node, [items[i][0] for i in work[node]], outcomes,
                            lambda key: self.membership.owners(key))
        self._check_quorum(len(items), work, outcomes, "written")
        return outcomes

    def delete(self, keys: list[bytes]) -> tuple[int, dict[str, object]]:
        """Remove keys from every owner; raises when a key has fewer than `write_quorum` acks.
        A missed owner is owed the delete (a hint, and a tombstone on the owners that did
        delete). Returns how many records the replicas removed in all, and each node's outcome."""
        _check_bytes([(k, b"") for k in keys])
        work: dict[str, list[int]] = defaultdict(list)
        for i, key in enumerate(keys):
            for node in self.membership.owners(key):
                work[node].append(i)
        outcomes = self._write_fan_out(work, lambda n, idx, left: self.conn(n).delete([keys[i] for i in idx], left),
                                       time.monotonic() + self.timeout)
        missed = {n: idx for n, idx in work.items() if isinstance(outcomes[n], Unavailable)}
        if missed:
            self._owe_deletes(keys, work, outcomes, missed)
        self._check_quorum(len(keys), work, outcomes, "deleted")
        return sum(o for o in outcomes.values() if isinstance(o, int)), outcomes

    def _owe_deletes(self, keys: list[bytes], work: dict[str, list[int]], outcomes: dict[str, object],
                     missed: dict[str, list[int]]) -> None:
        short = sorted({i for idx in missed.values() for i in idx})
        for node, idx in missed.items():
            self.hints.add_delete(node, [keys[i] for i in idx])
        tombs: dict[str, list[tuple[bytes, bytes]]] = defaultdict(list)
        wanted = set(short)
        for node, idx in work.items():
            if isinstance(outcomes[node], int):
                for i in idx:
                    if i in wanted and (tomb := tombstone_key(keys[i])) is not None:
                        tombs[node].append((tomb, TOMBSTONE))
        for node, items in tombs.items():
            try:
                self.conn(node).put(items, self.timeout)
            except KVCacheError as exc:  # the in-memory hint still covers this client's reads
                log.warning("tombstones for %d deleted keys not written on %s: %s", len(items), node, exc)

    def _drop_tombstones(self, keys: list[bytes]) -> None:
        """Every owner deleted these keys (or they were written again): remove their tombstones."""
        by_node: dict[str, list[bytes]] = defaultdict(list)
        for key in keys:
            tomb = tombstone_key(key)
            if tomb is not None:
                for node in self.membership.owners(key):
                    by_node[node].append(tomb)
        for node, tombs in by_node.items():
            try:
                self.conn(node).delete(tombs, self.timeout)
            except KVCacheError as exc:
                log.info("tombstones on %s kept for the repair pass: %s", node, exc)

    def _deliver_hint(self, node: str, items: list[tuple[bytes, bytes]]) -> None:
        self.conn(node).put(items, self.timeout + sum(len(v) for _, v in items) / 50e6)

    def _deliver_delete(self, node: str, keys: list[bytes]) -> None:
        self.conn(node).delete(keys, self.timeout)

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
            exc = type(first)(f"{short} of {count} records {done} below write quorum "
                              f"({self.membership.write_quorum}): {first}")
            exc.code = first.code
            raise exc from first

    # ---- reads --------------------------------------------------------------------------
    def _in_rank_order(self, orders: Sequence[Sequence[str]], indices: Iterable[int],
                       ask: Callable[[str, list[int], Read, Attempt], None], settled: Callable[[int], bool]) -> None:
        """The one read loop (``kvclient.hedged.in_rank_order``) on this set's per-node threads."""
        self.hedged += in_rank_order(self._submit, self.membership.mark_down, self.timeout, self.hedge_after,
                                     orders, indices, ask, settled)

    def fetch(self, keys: Sequence[bytes], orders: Sequence[Sequence[str]], indices: Iterable[int],
              results: list[bytes | None], sink: Sink | None = None,
              copies: dict[int, bytes] | None = None) -> None:
        """Fill results[i] for `indices` from their replicas in order; raise Unavailable for any
        key that no replica answered; write back to replicas that lacked or damaged a record.

        With `sink`, each record goes to sink([(i, view, None)]) as it arrives instead (verified,
        one call at a time), received into a connection's reusable buffer: no fresh memory per
        record; results[i] then only marks what was found (b""), and `copies`, if given, gets a
        copy of each (for the edge tier)."""
        lacking: dict[int, list[str]] = defaultdict(list)  # replicas that answered missing/corrupt
        owed: dict[int, bytes] = {}  # what read repair writes back

        def ask(node: str, idx: list[int], call: Read, attempt: Attempt) -> None:
            entries = self.conn(node).get([keys[i] for i in idx], self._left(node, call.deadline), reuse=sink is not None)
            for j, value, corrupt in entries:
                attempt.seen = time.monotonic()
                i = idx[j]
                with call.lock:
                    if call.done:
                        return  # the call ended: nothing more lands in its results or sink
                    if results[i] is not None:
                        continue  # a hedged replica answered first
                    if value is None:
                        if not corrupt:
                            call.answered.add(i)  # "missing" is an answer; damaged bytes are not
                        lacking[i].append(node)
                        continue
                    call.answered.add(i)
                    if sink is None:
                        results[i] = value
                    else:
                        sink([(i, memoryview(value), None)])
                        results[i] = b""
                        if copies is not None:
                            copies[i] = bytes(value)
                    if lacking.get(i):  # a replica before this one lacked it
                        owed[i] = value if sink is None else bytes(value)

        self._in_rank_order(orders, indices, ask, lambda i: results[i] is not None)
        self._read_repair(keys, owed, lacking)

    def present(self, keys: Sequence[bytes], orders: Sequence[Sequence[str]], indices: Iterable[int],
                present: list[bool]) -> None:
        """Set present[i] for `indices` by Lookup over their replicas (same miss rule as fetch)."""

        def ask(node: str, idx: list[int], call: Read, attempt: Attempt) -> None:
            answer = self.conn(node).lookup([keys[i] for i in idx], self._left(node, call.deadline))
            with call.lock:
                if call.done:
                    return
                for i, p in zip(idx, answer):
                    present[i] = present[i] or p
                    call.answered.add(i)

        self._in_rank_order(orders, indices, ask, lambda i: present[i])

    def _read_repair(self, keys: Sequence[bytes], owed_values: dict[int, bytes], lacking: dict[int, list[str]]) -> None:
        """Write records back to replicas that lacked them or held damaged copies (background)."""
        owed: dict[str, list[tuple[bytes, bytes]]] = defaultdict(list)
        for i, value in owed_values.items():
            for node in lacking[i]:
                owed[node].append((keys[i], value))
        for node, items in owed.items():
            self.repairs += len(items)
            self._repairing.track(self._submit(node, self._repair_one, node, items))

    def flush(self, timeout: float | None = None) -> None:
        """Wait for the read repairs started so far (each is written or handed to the hints)."""
        self._repairing.flush(timeout)

    def _repair_one(self, node: str, items: list[tuple[bytes, bytes]]) -> None:
        """Write back what `node` lacked, except keys it holds a tombstone of (deleted there:
        the copy that was read is the stale one, and writing it back would resurrect it)."""
        try:
            conn = self.conn(node)
            tombs = [tombstone_key(k) for k, _ in items]
            asked = [t for t in tombs if t is not None]
            deleted = {t for t, p in zip(asked, conn.lookup(asked, self.timeout)) if p} if asked else set()
            items = [item for item, t in zip(items, tombs) if t not in deleted]
            if deleted:
                log.info("read repair skipped %d deleted keys on %s", len(deleted), node)
            if items:
                conn.put(items, self.timeout + sum(len(v) for _, v in items) / 50e6)
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
        """Finish the read repairs under way (bounded by their deadlines), then stop; reads still
        waiting on a hung node are abandoned (their calls already returned)."""
        self.hints.close()
        try:
            self.flush(2 * self.timeout)
        except Exception as exc:  # noqa: BLE001 - a repair that did not finish is healed later
            log.info("read repairs left unfinished at close: %s", exc)
        with self._lock:
            pools = list(self._pools.values())
        for pool in pools:
            pool.shutdown(wait=False, cancel_futures=True)
        for conn in self._conns.values():
            conn.close()
