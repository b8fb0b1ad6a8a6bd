"""The cluster client inference services link: routing, replication, fallback, deadlines.

Reads go to the first healthy replica and fall back to the next on UNAVAILABLE, deadline,
checksum failure or a miss (a replica may have been down when the record was written). Writes go
to `replication` distinct owners in parallel and succeed when `write_quorum` of them acked.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

from . import record
from .cluster import ClusterSpec, parse_nodes
from .colocated import ColocatedReader
from .colocated_reads import ColocatedReads
from .errors import Corrupt, KVCacheError, Unavailable
from .node import Credentials, NodeConnection
from .recency import TouchBatcher
from .healing import HintQueue
from .ring import DEFAULT_VNODES, HashRing

log = logging.getLogger(__name__)

DOWN_SECONDS = 1.0  # after a node fails, try it last for this long


class Client(ColocatedReads):
    def __init__(
        self,
        nodes: Sequence[str] | str,
        replication: int = 2,
        timeout: float = 10.0,
        *,
        write_quorum: int = 1,
        vnodes: int = DEFAULT_VNODES,
        token: str | None = None,
        tls_ca: bytes | str | None = None,
        stream_timeout: float = 120.0,
        colocated: bool = True,
        verify_colocated: bool = True,
        stripe: bool = True,
    ) -> None:
        self.cluster_file: str | None = None
        if isinstance(nodes, str):
            spec_text = nodes
            cluster, nodes = parse_nodes(spec_text)
            if cluster is not None:  # the file is the source of truth for the cluster's shape
                self.cluster_file = os.path.abspath(spec_text)
                replication, vnodes = cluster.replication, cluster.vnodes
        if replication < 1:
            raise ValueError("replication must be >= 1")
        if isinstance(tls_ca, str):
            with open(tls_ca, "rb") as f:
                tls_ca = f.read()
        self._requested_quorum = write_quorum
        self._set_ring(HashRing(nodes, vnodes), replication)
        self._file_mtime = os.stat(self.cluster_file).st_mtime_ns if self.cluster_file else 0
        self._checked_at = time.monotonic()
        self.hints = HintQueue(lambda node, items: self.conn(node).put(items, self.stream_timeout))
        self.timeout = timeout
        self.stream_timeout = stream_timeout
        self._creds = Credentials(token=token, tls_ca=tls_ca)
        self._conns: dict[str, NodeConnection] = {}
        self._down_until: dict[str, float] = {}
        self._lock = threading.Lock()
        self.colocated = colocated
        self.verify_colocated = verify_colocated
        self._readers: dict[str, ColocatedReader | None] = {}
        self.reads = {"colocated": 0, "grpc": 0}
        self.repairs = 0
        self.stripe = stripe
        self._pool = ThreadPoolExecutor(max_workers=max(4, 2 * len(self.ring.nodes)), thread_name_prefix="kvclient")
        self._touches = TouchBatcher(self._touch)

    # ---- membership -----------------------------------------------------------------------
    def _set_ring(self, ring: HashRing, replication: int) -> None:
        self.ring = ring
        self.replication = min(replication, len(ring.nodes))
        self.write_quorum = min(self._requested_quorum, self.replication)

    def refresh(self, force: bool = False) -> bool:
        """Reload the cluster file if it changed (checked at most once a second)."""
        if not self.cluster_file or (not force and time.monotonic() - self._checked_at < 1.0):
            return False
        self._checked_at = time.monotonic()
        try:
            mtime = os.stat(self.cluster_file).st_mtime_ns
            if mtime == self._file_mtime and not force:
                return False
            spec = ClusterSpec.load(self.cluster_file)
        except (OSError, ValueError) as exc:
            log.warning("keeping the current ring: %s", exc)
            return False
        self._file_mtime = mtime
        self._set_ring(HashRing(spec.nodes, spec.vnodes), spec.replication)
        log.info("cluster file reloaded: %d nodes, replication %d", len(spec.nodes), spec.replication)
        return True

    # ---- plumbing -------------------------------------------------------------------------
    def conn(self, node: str) -> NodeConnection:
        with self._lock:
            if node not in self._conns:
                self._conns[node] = NodeConnection(node, self._creds)
            return self._conns[node]

    def _mark_down(self, node: str) -> None:
        self._down_until[node] = time.monotonic() + DOWN_SECONDS

    def replicas(self, key: bytes, stripe: int = 0) -> list[str]:
        """Owners of a key, healthy ones first; `stripe` rotates them so that a batch's reads
        spread over all replicas (striped fetch) instead of all hitting the primaries."""
        owners = self.ring.owners(key, self.replication)
        if self.stripe and len(owners) > 1:
            shift = stripe % len(owners)
            owners = owners[shift:] + owners[:shift]
        now = time.monotonic()
        return sorted(owners, key=lambda n: self._down_until.get(n, 0.0) > now)

    def _fan_out(self, work: dict[str, list[int]], call, reads: bool = True) -> dict[str, object]:
        """Run call(node, indices) per node in parallel; a failure is returned, not raised.

        For reads, only failures another replica can cure (unreachable node, deadline, damaged
        bytes) are returned; a request the cluster refuses (bad key, auth) is raised at once.
        """
        futures = {node: self._pool.submit(call, node, idx) for node, idx in work.items()}
        results: dict[str, object] = {}
        for node, fut in futures.items():
            try:
                results[node] = fut.result()
            except KVCacheError as exc:
                if isinstance(exc, Unavailable):
                    self._mark_down(node)
                elif reads and not isinstance(exc, Corrupt):
                    raise
                log.debug("node %s failed: %s", node, exc)
                results[node] = exc
        return results

    @staticmethod
    def _by_rank(orders, pending: Iterable[int], rank: int) -> dict[str, list[int]]:
        """Group keys by their `rank`-th replica (orders fixed once per call)."""
        work: dict[str, list[int]] = defaultdict(list)
        for i in pending:
            owners = orders[i]
            if rank < len(owners):
                work[owners[rank]].append(i)
        return work

    # ---- writes -------------------------------------------------------------------------
    def put(self, key: bytes, value: bytes | memoryview) -> None:
        self.put_many([(key, value)])

    def put_many(self, items: Sequence[tuple[bytes, bytes | memoryview]]) -> None:
        """Write each record to its replicas. The records one node receives commit atomically."""
        self.refresh()
        items = list(items)
        work: dict[str, list[int]] = defaultdict(list)
        for i, (key, _) in enumerate(items):
            for node in self.ring.owners(key, self.replication):
                work[node].append(i)
        size = sum(len(v) for _, v in items)
        timeout = self.timeout + size / 50e6  # allow 50 MB/s beyond the base deadline

        def send(node: str, idx: list[int]) -> None:
            self.conn(node).put([items[i] for i in idx], timeout)

        acks = [0] * len(items)
        errors = []
        for node, outcome in self._fan_out(work, send, reads=False).items():
            if isinstance(outcome, KVCacheError):
                errors.append(outcome)
                if isinstance(outcome, Unavailable):  # owed to the node once it is back
                    self.hints.add(node, [items[i] for i in work[node]])
                continue
            for i in work[node]:
                acks[i] += 1
        short = sum(1 for a in acks if a < self.write_quorum)
        if short:
            first = errors[0] if errors else Unavailable("no replica acknowledged")
            raise type(first)(f"{short} of {len(items)} records below write quorum: {first}")

    def delete(self, keys: Sequence[bytes]) -> int:
        self.refresh()
        keys = list(keys)
        work: dict[str, list[int]] = defaultdict(list)
        for i, key in enumerate(keys):
            for node in self.ring.owners(key, self.replication):
                work[node].append(i)
        outcomes = self._fan_out(work, lambda n, idx: self.conn(n).delete([keys[i] for i in idx], self.timeout), False)
        return sum(o for o in outcomes.values() if isinstance(o, int))

    # ---- reads --------------------------------------------------------------------------
    def get(self, key: bytes) -> bytes | None:
        return self.get_many([key])[0]

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        """Values in key order (None for a miss on every replica)."""
        self.refresh()
        keys = list(keys)
        if self.colocated:
            results: list[bytes | None] = [None] * len(keys)

            def keep(batch) -> None:
                for i, view in batch:
                    results[i] = bytes(view)

            self.read_into(keys, keep)
            return results
        return self._get_many_grpc(keys)

    def _get_many_grpc(self, keys: list[bytes]) -> list[bytes | None]:
        results: list[bytes | None] = [None] * len(keys)
        pending = list(range(len(keys)))
        orders = [self.replicas(k, i) for i, k in enumerate(keys)]
        lacking: dict[int, list[str]] = defaultdict(list)  # replicas that answered missing/corrupt
        unreachable = 0
        for rank in range(self.replication):
            if not pending:
                break
            work = self._by_rank(orders, pending, rank)

            def fetch(node: str, idx: list[int]) -> list[int]:
                found = []
                for j, value, _corrupt in self.conn(node).get([keys[i] for i in idx], self.stream_timeout):
                    if value is not None:
                        results[idx[j]] = value
                        found.append(idx[j])
                    else:
                        lacking[idx[j]].append(node)
                return found

            outcomes = self._fan_out(work, fetch)
            unreachable = sum(len(work[n]) for n, o in outcomes.items() if isinstance(o, KVCacheError))
            pending = [i for i in pending if results[i] is None]
        if pending and unreachable == len(pending):
            raise Unavailable(f"{len(pending)} keys: no replica reachable")
        self._read_repair(keys, results, lacking)
        return results

    def _read_repair(self, keys: list[bytes], results: list[bytes | None], lacking: dict[int, list[str]]) -> None:
        """Write records back to replicas that lacked them or held damaged copies (background)."""
        owed: dict[str, list[tuple[bytes, bytes]]] = defaultdict(list)
        for i, nodes in lacking.items():
            if results[i] is not None:
                for node in nodes:
                    owed[node].append((keys[i], results[i]))
        for node, items in owed.items():
            self.repairs += len(items)
            self._pool.submit(self._repair_one, node, items)

    def _repair_one(self, node: str, items: list[tuple[bytes, bytes]]) -> None:
        try:
            self.conn(node).put(items, self.stream_timeout)
        except KVCacheError as exc:
            log.info("read repair of %d records on %s deferred: %s", len(items), node, exc)
            self.hints.add(node, items)

    def exists(self, keys: Sequence[bytes]) -> list[bool]:
        """Which keys are stored. Co-located replicas answer from their map (no RPC on the hot
        path); their nodes still get a Lookup of the hits, batched in the background
        (kvclient.recency), which keeps LRU recency."""
        self.refresh()
        keys = list(keys)
        present = [False] * len(keys)
        readers, local, all_local = self._local_groups(keys)
        for node, idx in local.items():
            for i, p in zip(idx, readers[node].contains([keys[i] for i in idx])):
                present[i] = p
            hits = [keys[i] for i in idx if present[i]]
            if hits:
                self._touches.add(node, hits)
        pending = [i for i in range(len(keys)) if not present[i] and not all_local[i]]
        # a co-located replica already answered from its map: ask only the others
        orders = {i: [n for n in self.replicas(keys[i], i) if readers.get(n) is None] for i in pending}
        for rank in range(self.replication):
            if not pending:
                break
            work = self._by_rank(orders, pending, rank)
            outcomes = self._fan_out(work, lambda n, idx: self.conn(n).lookup([keys[i] for i in idx], self.timeout))
            for node, outcome in outcomes.items():
                if not isinstance(outcome, KVCacheError):
                    for i, p in zip(work[node], outcome):
                        present[i] = present[i] or p
            pending = [i for i in pending if not present[i]]
        return present

    def _touch(self, node: str, keys: list[bytes]) -> None:
        try:
            self.conn(node).lookup(keys, self.timeout)
        except KVCacheError as exc:
            log.debug("recency touch on %s failed: %s", node, exc)

    def lookup(self, keys: Sequence[bytes]) -> int:
        """Length of the longest prefix of `keys` that is stored (the cached prefix)."""
        present = self.exists(keys)
        return record.prefix_length(present)

    def stat(self) -> dict[str, dict]:
        out: dict[str, dict] = {}
        for node in self.ring.nodes:
            try:
                reply = self.conn(node).stat(self.timeout)
                out[node] = {f.name: getattr(reply, f.name) for f in reply.DESCRIPTOR.fields}
            except KVCacheError as exc:
                out[node] = {"error": str(exc)}
        return out

    # ---- lifecycle ----------------------------------------------------------------------
    def close(self) -> None:
        self._touches.close()
        self.hints.close()
        for reader in self._readers.values():
            if reader is not None:
                reader.close()
        self._pool.shutdown(wait=True)
        for conn in self._conns.values():
            conn.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
