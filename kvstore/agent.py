"""The node's rebalancer: each node keeps its own share of the ring filled, no coordinator.

Why in the node (and not a kvclient process): the data it moves is its own (its LMDB for pushes,
its LMDB for pulls), it must run whenever the node runs (an operator starts nothing), and the
decision "which keys do I own" needs only the ring and the member list from etcd, which every
node watches anyway. No leader is needed: each node acts only on its own keys.

On every membership change (and every `period` seconds):
- **pull** (a node in state "joining": just started, empty or behind): scan every other member,
  fetch the keys this node now owns and lacks, then say "ready" in etcd. Until then clients write
  to it but read from the others (no storm of misses after a restart).
- **push** (every node): for each local key, the ready owners that lack it (one Lookup per batch,
  tombstones asked too: a deleted key is never pushed back) get it. This refills what a leave or
  a lease expiry left below replication; copies on nodes that no longer own a key stay as edge
  copies (evicted first, ``kvstore.edge``).

Both are throttled by a byte-rate cap, abort and start again at the next batch when membership
changes, and skip what is already in place: an interrupted pass resumes where it left off at
the cost of Lookups. Progress is in ``status`` (etcd ``status/<id>``, ``kvctl status``) and in
Prometheus (``kvstore_rebalance_*``).

Placement: a record's owners are computed from the key its client placed (``kvclient`` hashes
its own key, ``kvproto.ring``); a tombstone's from the key it stands for; hint records are never
moved (``kvstore.hints`` delivers them). On auth nodes the agent works on stored keys (tenant
prefix ‖ key) with the cluster's peer token and strips the 16-byte prefix for placement; stored
keys under no tenant of the tokens file are readable by no client and stay where they are.
What it copies goes straight to storage on both ends: no tenant write, load or meter entry.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict

from kvproto.errors import KVCacheError
from kvproto.etcd import JOINING, READY, ClusterView
from kvproto.hints import is_hint
from kvproto.ring import HashRing
from kvproto.tombstones import deleted_key, tombstone_key

from .auth import NO_AUTH, KeySpaces
from .etcd_member import EtcdMember
from .hints import local_records, stored_keys
from .peers import Peers
from .storage import IncomingRecord, Storage

log = logging.getLogger(__name__)

BATCH = 32
LOOKUP_BATCH = 1000


class Changed(Exception):
    """Membership changed under a pass: start again with the new ring."""


class Rebalancer:
    def __init__(self, storage: Storage, peers: Peers, member: EtcdMember, rate_bytes: float,
                 timeout: float = 30.0, period: float = 30.0, spaces: KeySpaces = NO_AUTH) -> None:
        self.storage = storage
        self.spaces = spaces
        self.peers = peers
        self.member = member
        self.rate_bytes = rate_bytes
        self.timeout = timeout
        self.period = period
        self.address = member.member.address
        self.status = {"state": member.member.state, "phase": "idle", "to_move": 0, "moved": 0,
                       "bytes": 0, "rate_bytes_per_s": 0.0, "passes": 0, "failed": 0}
        self.moved_total = 0
        self.bytes_total = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._generation = 0
        self._shape = None
        self.current: tuple[HashRing, int] | None = None
        self._published = 0.0
        self._window = (time.monotonic(), 0)  # throttle: start of the pass, bytes since
        member.watch.on_change = self._on_change
        self._thread = threading.Thread(target=self._run, name="kvstore-rebalance", daemon=True)

    def start(self) -> "Rebalancer":
        self._wake.set()
        self._thread.start()
        return self

    def _on_change(self, view: ClusterView) -> None:
        shape = (view.members, view.replication, view.vnodes)
        if shape != self._shape:  # status records of other nodes change often: not a reason
            self._shape = shape
            self._generation += 1
            self._wake.set()

    def _check(self, generation: int) -> None:
        if self._stop.is_set() or generation != self._generation:
            raise Changed

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._wake.wait(self.period):
                self._wake.set()
                continue
            self._wake.clear()
            generation = self._generation
            try:
                ok = self.run_pass(self.member.view, generation)
            except Changed:
                continue
            except Exception:  # noqa: BLE001 - the node serves on; the next pass tries again
                log.exception("rebalance pass failed")
                ok = False
            if not ok and not self._stop.is_set():
                self._stop.wait(1.0)
                self._wake.set()

    # ---- one pass -------------------------------------------------------------------------
    def run_pass(self, view: ClusterView, generation: int) -> bool:
        """Pull (if joining) then push; True when nothing was left undone."""
        nodes = view.addresses()
        if self.address not in nodes:
            return False  # not (yet, or no longer) registered: nothing is ours
        ring = HashRing(nodes, view.vnodes)
        replication = min(view.replication, len(nodes))
        self.current = (ring, replication)  # what eviction asks: owned here, or an edge copy
        ready = set(view.addresses(READY))
        self.status.update(passes=self.status["passes"] + 1, to_move=0, moved=0, bytes=0, failed=0)
        self._window = (time.monotonic(), 0)
        ok = True
        if self.member.member.state == JOINING:
            ok = self._pull(ring, replication, [n for n in nodes if n != self.address], generation)
            if ok:
                self._check(generation)
                self.member.set_state(READY)
                self.status["state"] = READY
        ok = self._push(ring, replication, ready, generation) and ok
        self.status["phase"] = "idle"
        self._publish(force=True)
        return ok

    def _pull(self, ring: HashRing, replication: int, peers: list[str], generation: int) -> bool:
        self.status["phase"] = "pull"
        wanted: dict[str, list[bytes]] = defaultdict(list)
        seen: set[bytes] = set()
        ok = True
        for peer in peers:
            try:
                keys = self.peers(peer).scan_all(self.timeout)
            except KVCacheError as exc:
                log.info("cannot scan %s yet: %s", peer, exc)
                ok = False
                continue
            mine = [k for k in keys if k not in seen and (where := self._placement(k)) is not None
                    and self.address in ring.owners(where, replication)]
            seen.update(mine)
            have = self.storage.exists(mine) if mine else []
            wanted[peer] = [k for k, h in zip(mine, have) if not h]
        self.status["to_move"] = sum(len(v) for v in wanted.values())
        self._publish(force=True)
        for peer, keys in wanted.items():
            for at in range(0, len(keys), BATCH):
                self._check(generation)
                batch = keys[at : at + BATCH]
                try:
                    values = self.peers(peer).get(batch, self.timeout)
                except KVCacheError as exc:
                    log.info("pull from %s interrupted: %s", peer, exc)
                    self.status["failed"] += len(keys) - at
                    ok = False
                    break
                got = [(k, v) for k, v in zip(batch, values) if v is not None]
                for tenant, items in self.spaces.by_tenant(got).items():  # in its ledger, as its client wrote
                    self.storage.put_batch([IncomingRecord.of(k, v) for k, v in items], tenant)
                self._moved(len(got), sum(len(v) for _, v in got))
        return ok

    def _push(self, ring: HashRing, replication: int, ready: set[str], generation: int) -> bool:
        self.status["phase"] = "push"
        owed: dict[str, list[bytes]] = defaultdict(list)
        for key, where in self._local_keys():
            for owner in ring.owners(where, replication):
                if owner != self.address and owner in ready:
                    owed[owner].append(key)
        ok = True
        missing: dict[str, list[bytes]] = {}
        for target, keys in owed.items():
            try:
                missing[target] = self._lacking(target, keys, generation)
            except KVCacheError as exc:
                log.info("cannot check %s: %s", target, exc)
                ok = False
        self.status["to_move"] += sum(len(v) for v in missing.values())
        self._publish(force=True)
        for target, keys in missing.items():
            for at in range(0, len(keys), BATCH):
                self._check(generation)
                items = local_records(self.storage, keys[at : at + BATCH], self.spaces)
                try:
                    if items:
                        self.peers(target).put(items, self.timeout)
                except KVCacheError as exc:
                    log.info("push to %s interrupted: %s", target, exc)
                    self.status["failed"] += len(keys) - at
                    ok = False
                    break
                self._moved(len(items), sum(len(v) for _, v in items))
        return ok

    def _lacking(self, target: str, keys: list[bytes], generation: int) -> list[bytes]:
        """The keys `target` has neither as a record nor as a tombstone (deleted there)."""
        out: list[bytes] = []
        for at in range(0, len(keys), LOOKUP_BATCH // 2):
            self._check(generation)
            batch = keys[at : at + LOOKUP_BATCH // 2]
            tombs = [self._tombstone(k) for k in batch]
            asked = batch + [t for t in tombs if t is not None]
            present = dict(zip(asked, self.peers(target).lookup(asked, self.timeout)))
            out += [k for k, t in zip(batch, tombs) if not present[k] and not (t is not None and present[t])]
        return out

    def _placement(self, stored: bytes) -> bytes | None:
        """The key whose ring owners hold `stored`; None for what the rebalancer leaves alone."""
        split = self.spaces.split(stored)
        if split is None or is_hint(split[1]):
            return None
        return deleted_key(split[1]) or split[1]

    def _tombstone(self, stored: bytes) -> bytes | None:
        """The stored key of the tombstone that would stand for `stored` (None: it is one)."""
        tenant, key = self.spaces.split(stored)
        tomb = tombstone_key(key) if deleted_key(key) is None else None
        return tenant + tomb if tomb is not None else None

    def _local_keys(self) -> list[tuple[bytes, bytes]]:
        """(stored key, placement key) of every record here the rebalancer may move."""
        return [(k, where) for k in stored_keys(self.storage) if (where := self._placement(k)) is not None]

    # ---- rate and progress ----------------------------------------------------------------
    def _moved(self, records: int, size: int) -> None:
        self.status["moved"] += records
        self.status["bytes"] += size
        self.moved_total += records
        self.bytes_total += size
        began, sent = self._window
        sent += size
        self._window = (began, sent)
        elapsed = time.monotonic() - began
        if self.rate_bytes > 0 and sent / self.rate_bytes > elapsed:  # over the cap: wait it out
            self._stop.wait(sent / self.rate_bytes - elapsed)
        self.status["rate_bytes_per_s"] = round(sent / max(1e-6, time.monotonic() - began))
        self._publish()

    def _publish(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._published > 1.0:
            self._published = now
            self.member.publish_status(dict(self.status))

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
