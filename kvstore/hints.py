"""The node's hint agent: deliver the writes other replicas missed, from this node's own copy.

A client that wrote a record here while another owner was down leaves a hint record
(``kvproto.hints``) beside it. Every `interval` seconds this agent scans the hint range, sends
the records to each target that answers (a peer Put) and deletes the delivered hints. A target
that does not answer is tried again after a back-off; a hint whose record is gone (evicted,
deleted) is dropped: the repair pass covers what is left. Hints live in the node's LMDB, so they
outlive the client that wrote them and a restart of this node.

Auth nodes: a tenant's client leaves its hint with its own token, so hint and record both sit
under the tenant's prefix. The agent scans the hint range under the prefix of every tenant of
the tokens file and sends the record to the target with the cluster's peer token
(``--peer-token-file``), into the same stored key; neither copy counts as a tenant write. An
auth node without a peer token delivers none (read repair and ``kvctl repair`` heal tenants).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Iterator

from kvproto.errors import Corrupt, KVCacheError
from kvproto.hints import PREFIX, parse_hint

from .auth import NO_AUTH, KeySpaces
from .peers import Peers
from .storage import Storage

log = logging.getLogger(__name__)

BATCH = 64
MAX_BACKOFF = 10.0


def stored_keys(storage: Storage, prefix: bytes = b"", page: int = 10_000) -> Iterator[bytes]:
    """Every stored key under `prefix`, in order, read a page at a time."""
    start = b""
    while True:
        keys = storage.scan(prefix, start, page)
        yield from keys
        if len(keys) < page:
            return
        start = keys[-1]


def local_records(storage: Storage, keys: list[bytes], spaces: KeySpaces = NO_AUTH,
                  ) -> list[tuple[bytes, bytes]]:
    """(stored key, payload) of the stored keys this node holds intact (missing, damaged and
    under no known tenant left out)."""
    items: list[tuple[bytes, bytes]] = []
    for key in keys:
        split = spaces.split(key)
        if split is None:
            continue
        try:
            value = storage.get(split[1], split[0])  # the digest binds the client's key
        except Corrupt:
            value = None
        if value is not None:
            items.append((key, value))
    return items


class HintAgent:
    def __init__(self, storage: Storage, peers: Peers, interval: float = 0.5, timeout: float = 10.0,
                 spaces: KeySpaces = NO_AUTH) -> None:
        self.storage = storage
        self.peers = peers
        self.spaces = spaces
        self.interval = interval
        self.timeout = timeout
        self.delivered = 0
        self.pending = 0
        self._retry_at: dict[str, float] = {}
        self._backoff: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kvstore-hints", daemon=True)

    def start(self) -> "HintAgent":
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.deliver_once()
            except KVCacheError as exc:  # a damaged store: its own signals say so
                log.debug("hint pass skipped: %s", exc)

    def deliver_once(self) -> int:
        """One pass over the hint range; returns how many records were delivered."""
        owed: dict[str, list[tuple[bytes, bytes]]] = defaultdict(list)  # target -> (hint, record), stored
        for root in self.spaces.roots:
            for stored in stored_keys(self.storage, root + PREFIX):
                if (parsed := parse_hint(stored[len(root):])) is not None:
                    owed[parsed[0]].append((stored, root + parsed[1]))
        self.pending = sum(len(v) for v in owed.values())
        sent = 0
        now = time.monotonic()
        for target, entries in owed.items():
            if self._retry_at.get(target, 0.0) > now:
                continue
            for at in range(0, len(entries), BATCH):
                batch = entries[at : at + BATCH]
                if not self._deliver(target, batch):
                    break
                sent += len(batch)
        self.delivered += sent
        self.pending -= sent
        return sent

    def _deliver(self, target: str, batch: list[tuple[bytes, bytes]]) -> bool:
        items = local_records(self.storage, [key for _, key in batch], self.spaces)
        try:
            if items:
                self.peers(target).put(items, self.timeout + sum(len(v) for _, v in items) / 50e6)
        except KVCacheError as exc:
            backoff = min(MAX_BACKOFF, self._backoff.get(target, self.interval) * 2)
            self._backoff[target] = backoff
            self._retry_at[target] = time.monotonic() + backoff
            log.debug("hints for %s not delivered yet (retry in %.1fs): %s", target, backoff, exc)
            return False
        self._backoff.pop(target, None)
        self._retry_at.pop(target, None)
        for tenant, hints in self.spaces.by_tenant(batch).items():  # where the client put them
            self.storage.delete([hint for hint, _ in hints], tenant)
        log.info("delivered %d hinted records to %s", len(items), target)
        return True

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
