"""Hedged reads: ask each key's replicas in rank order, and the next one early if a replica is
silent (no entry for `hedge_after` seconds). The first answer wins; answers after the call ended
are dropped (its results and sink are the caller's again), and the call never outlives `timeout`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait

from kvproto.errors import Corrupt, KVCacheError, Unavailable

log = logging.getLogger(__name__)


class Read:
    """One read call's shared state: answers land under `lock` until `done` (late ones drop)."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.lock = threading.Lock()
        self.done = False
        self.answered: set[int] = set()

    def left(self) -> float:
        return self.deadline - time.monotonic()


class Attempt:
    """One request to one node inside a read: when it last showed progress, whether hedged."""

    __slots__ = ("node", "idx", "seen", "hedged")

    def __init__(self, node: str, idx: list[int]) -> None:
        self.node, self.idx = node, idx
        self.seen = time.monotonic()
        self.hedged = False



def in_rank_order(submit: Callable[..., Future], mark_down: Callable[[str], None], timeout: float,
                  hedge_after: float, orders: Sequence[Sequence[str]], indices: Iterable[int],
                  ask: Callable[[str, list[int], Read, Attempt], None], settled: Callable[[int], bool]) -> int:
    """ask(node, key indices, call, attempt) of each key's replicas in order until settled(i),
    hedging silent replicas; raise Unavailable for the keys no replica answered (the one
    miss rule of every read). Answers after the call ended are dropped by `ask`. `submit(node,
    fn, *args)` runs fn on the node's threads. Returns how many keys were hedged."""
    pending = list(indices)
    if not pending:
        return 0
    hedged = 0
    call = Read(time.monotonic() + timeout)
    next_rank = dict.fromkeys(pending, 0)
    outstanding: dict[int, int] = defaultdict(int)
    inflight: dict[Future, Attempt] = {}
    errors: list[KVCacheError] = []

    def launch(idx: Iterable[int]) -> None:
        work: dict[str, list[int]] = defaultdict(list)
        for i in idx:
            rank = next_rank[i]
            if rank < len(orders[i]):
                work[orders[i][rank]].append(i)
                next_rank[i] = rank + 1
                outstanding[i] += 1
        for node, keys in work.items():
            attempt = Attempt(node, keys)
            if not inflight and len(work) == 1 and all(next_rank[i] == len(orders[i]) for i in keys):
                future: Future = Future()  # nothing to hedge to: no thread hop
                try:
                    future.set_result(ask(node, keys, call, attempt))
                except BaseException as exc:  # noqa: BLE001 - judged below like a pool call's
                    future.set_exception(exc)
            else:
                future = submit(node, ask, node, keys, call, attempt)
            inflight[future] = attempt

    def waiting() -> bool:
        """Whether a key is still to be decided by an attempt in flight: one that shows life,
        or a silent one when no other replica answered the key (it is the last hope)."""
        live = {i for a in inflight.values() if not a.hedged for i in a.idx}
        silent = {i for a in inflight.values() if a.hedged for i in a.idx}
        return any(not settled(i) and (i in live or (i in silent and i not in call.answered)) for i in pending)

    try:
        launch(pending)
        while inflight and waiting():
            now = time.monotonic()
            if now >= call.deadline:
                break
            quiet = [a.seen + hedge_after for a in inflight.values() if not a.hedged]
            until = min([call.deadline, *quiet])
            done, _ = wait(list(inflight), timeout=max(0.0, until - now), return_when=FIRST_COMPLETED)
            advance: list[int] = []
            for future in done:
                attempt = inflight.pop(future)
                exc = future.exception()
                if exc is not None:
                    if not isinstance(exc, KVCacheError):
                        raise exc
                    if isinstance(exc, Unavailable):
                        mark_down(attempt.node)
                    elif not isinstance(exc, Corrupt):
                        raise exc  # a request the cluster refuses (bad key, auth): no replica cures it
                    log.debug("node %s failed: %s", attempt.node, exc)
                    errors.append(exc)
                for i in attempt.idx:
                    outstanding[i] -= 1
                    if outstanding[i] == 0 and not settled(i):
                        advance.append(i)
            now = time.monotonic()
            for attempt in inflight.values():
                if not attempt.hedged and now - attempt.seen >= hedge_after:
                    attempt.hedged = True
                    silent = [i for i in attempt.idx if not settled(i) and next_rank[i] < len(orders[i])]
                    if silent:
                        mark_down(attempt.node)
                        hedged += len(silent)
                        log.debug("%s silent for %.2f s: %d keys hedged", attempt.node, hedge_after, len(silent))
                        advance.extend(silent)
            launch(dict.fromkeys(advance))
    finally:
        with call.lock:
            call.done = True
    unanswered = [i for i in pending if not settled(i) and i not in call.answered]
    if unanswered:
        silent = sorted({a.node for a in inflight.values()})
        last = errors[-1] if errors else None
        why = f"; last error: {last}" if last else ""
        if silent:
            why += f"; no answer within {timeout:g} s from {', '.join(silent)}"
        raise Unavailable(f"{len(unanswered)} keys: no replica answered{why}") from last
    return hedged

