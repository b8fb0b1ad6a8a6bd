"""The cluster client inference services link: one public class over parts with one job each.

- ``membership.Membership``: ring, replication, write quorum, cluster file, down nodes;
- ``replicas.ReplicaSet``: gRPC fan-out, quorum writes and deletes, hints, reads with fallback
  and read repair (its docstring has the miss semantics);
- ``colocated_reads.ColocatedReaders``: same-host nodes read through their LMDB map.

Each request resolves its keys' owners once (``Membership.routes``) and every pass uses them.
Implements ``kvproto.store.Store``.

    with Client("127.0.0.1:7070,127.0.0.1:7071", timeout=2) as kv:
        kv.put(b"key", b"value")      # -> Placement: the nodes that hold it now
        kv.get(b"key")                # -> b"value", or None for a miss
        kv.exists([b"key"])           # -> [True]
        kv.delete([b"key"])           # -> records removed; raises below the write quorum
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from kvproto import record
from kvproto.errors import KVCacheError
from kvproto.market import split_listing_key
from kvproto.pb import kvcache_pb2 as pb
from kvproto.store import Sink

from .colocated import ColocatedReader
from .colocated_meter import ColocatedMeter
from .colocated_reads import ColocatedReaders
from .edge import EdgeTier
from .healing import HintQueue, RebalanceReport, rebalance
from .membership import Membership
from .node import Credentials, NodeConnection
from .recency import TouchBatcher
from .replicas import ReplicaSet
from .ring import DEFAULT_VNODES, HashRing


@dataclass
class Placement:
    """Where a put landed: the nodes that acknowledged it, and the owners it missed (why)."""

    written: list[str]
    missed: dict[str, str] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.written)


class Client:
    """The cluster's client: ``get``/``put``/``delete``/``exists`` like redis-py, plus batched
    ``get_many``/``put_many``/``read_into``/``lookup`` for KV blocks.

    `nodes`: "HOST:PORT,HOST:PORT", a list of them, or a cluster file path (reloaded when it
    changes); or `etcd="HOST:PORT[,...]"` and `cluster=NAME`: the ring follows the nodes registered
    there (``kvclient.etcd_membership``). `timeout` bounds every call end to end (seconds); a read whose replica gives no
    sign of life within `hedge_after` (default: a quarter of `timeout`, at most 1 s) is also
    sent to the next replica. `stream_timeout` bounds background transfers (hints, repairs).
    Misses are None; an outage raises ``Unavailable``; errors name the node and the cause.
    """

    def __init__(
        self,
        nodes: Sequence[str] | str | None = None,
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
        hedge_after: float | None = None,
        etcd: str | None = None,
        cluster: str = "default",
        edge: bool = True,
    ) -> None:
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        if etcd is not None:  # the ring follows etcd (kvclient.etcd_membership); replication and vnodes too
            from .etcd_membership import EtcdMembership

            self.membership = EtcdMembership(etcd, cluster, write_quorum, stripe, wait=min(timeout, 10.0))
        elif nodes is None:
            raise ValueError("give nodes (HOST:PORT,... or a cluster file) or etcd=HOST:PORT")
        else:
            self.membership = Membership(nodes, replication, vnodes, write_quorum, stripe)
        if isinstance(tls_ca, str):
            with open(tls_ca, "rb") as f:
                tls_ca = f.read()
        self.timeout = timeout
        self.stream_timeout = stream_timeout
        self.colocated = colocated
        self.replica_set = ReplicaSet(self.membership, Credentials(token=token, tls_ca=tls_ca), timeout, stream_timeout,
                                      hedge_after)
        self.local = ColocatedReaders(self.replica_set.conn, timeout, verify_colocated)
        self.reads = {"colocated": 0, "remote": 0}  # records read through the map / the network
        self._reads_lock = threading.Lock()
        self._touches = TouchBatcher(self.replica_set.touch)
        # reads through a node's map, reported to that node's meter (kvclient.colocated_meter)
        self._meter = ColocatedMeter(self._report)
        self._market = None
        self.local.on_read = self._meter.add
        # the edge tier needs to know this host's node: membership from etcd (kvclient.edge)
        self.edge = EdgeTier(self.membership, self.replica_set.conn, timeout) if edge and etcd is not None else None

    @property
    def ring(self) -> HashRing:
        """The consistent-hash ring in use (from the node list or the cluster file)."""
        return self.membership.ring

    @property
    def replication(self) -> int:
        """Copies of each record (capped at the node count)."""
        return self.membership.replication

    @property
    def write_quorum(self) -> int:
        """Acknowledgements a put or delete needs per key before it returns."""
        return self.membership.write_quorum

    @property
    def hints(self) -> HintQueue:
        """Writes and deletes owed to nodes that were down (delivered in the background)."""
        return self.replica_set.hints

    @property
    def repairs(self) -> int:
        """Records written back by read repair so far."""
        return self.replica_set.repairs

    def refresh(self, force: bool = False) -> bool:
        """Reload the cluster file if it changed; True if the ring changed."""
        return self.membership.refresh(force)

    def conn(self, node: str) -> NodeConnection:
        """The gRPC connection to one node (for operator calls)."""
        return self.replica_set.conn(node)

    def reader(self, node: str) -> ColocatedReader | None:
        """The node's co-located LMDB reader, or None where reads go over the network."""
        return self.local.reader(node) if self.colocated else None

    def replicas(self, key: bytes, stripe: int = 0) -> list[str]:
        """A key's owners in the order a read asks them (healthy ones first)."""
        return self.membership.replicas(key, stripe)

    def _route(self, keys: Sequence[bytes]):
        """Owners of every key (once), and which of them this process can read directly. A
        node that still owes a key's delete (it was down) is not asked for that key."""
        self.membership.refresh()
        orders = self.membership.routes(keys)
        if self.edge is not None:
            orders = self.edge.read_orders(orders)
        hints = self.replica_set.hints
        if hints.has_deletes():
            orders = [[n for n in owners if not hints.owes_delete(n, keys[i])] for i, owners in enumerate(orders)]
        if not self.colocated:
            return orders, {}, {}, [False] * len(keys)
        readers, local, all_local = self.local.groups(self.membership.ring.nodes, orders)
        listed = {i for i, key in enumerate(keys) if split_listing_key(key) is not None}
        if listed:  # another tenant's record, read under a grant: only the node may serve (and meter) it
            local = {node: kept for node, idx in local.items() if (kept := [i for i in idx if i not in listed])}
            all_local = [flag and i not in listed for i, flag in enumerate(all_local)]
        return orders, readers, local, all_local

    def put(self, key: bytes, value: bytes | memoryview) -> Placement:
        """Store `value` (bytes-like; TypeError otherwise) under `key` on its owners. Returns
        where it landed; an owner that was down is owed it (delivered when it is back)."""
        outcomes = self.put_many([(key, value)])
        written = [n for n, o in outcomes.items() if not isinstance(o, KVCacheError)]
        return Placement(written, {n: str(o) for n, o in outcomes.items() if isinstance(o, KVCacheError)})

    def put_many(self, items: Sequence[tuple[bytes, bytes | memoryview]]) -> dict[str, object]:
        """Write each record to its replicas (each digest computed once). The records one node
        receives commit atomically; raises when a record is below the write quorum. Returns
        each node's outcome (its reply, or the error a hint now covers)."""
        self.membership.refresh()
        outcomes = self.replica_set.put_many(list(items))
        if self.edge is not None:
            self.edge.place(items)
        return outcomes

    def delete(self, keys: Sequence[bytes] | bytes) -> int:
        """Delete keys (one bytes key or a list) from every owner; raises below the write
        quorum, like put. An owner that was down gets the delete when it is back, and until
        then is not read for those keys. Returns how many records the replicas removed."""
        self.membership.refresh()
        return self.replica_set.delete([keys] if isinstance(keys, bytes) else list(keys))[0]

    def repair(self) -> RebalanceReport:
        """Anti-entropy: scan every node, copy each key to the owners that lack it, apply
        tombstones (stale copies of deleted keys go). Run after a node returns empty or behind."""
        self.membership.refresh()
        return rebalance(self, self.ring.nodes)

    def get(self, key: bytes) -> bytes | None:
        """The value stored under `key`, or None for a miss."""
        return self.get_many([key])[0]

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        """Values in key order (None: a miss on every replica that answered)."""
        keys = list(keys)
        results: list[bytes | None] = [None] * len(keys)

        def keep(batch) -> None:  # co-located views die with the sink: copy them out
            for i, view, _ in batch:
                results[i] = bytes(view)

        self._read(keys, keep, True, results)
        return results

    def read_into(self, keys: Sequence[bytes], sink: Sink, verify: bool = True) -> list[bool]:
        """Hand the stored keys' payloads to `sink` in batches of (key index, payload view,
        digest to check or None); see ``kvproto.store.Store``.

        Keys with a co-located replica come as views of its memory map (no copy before the
        sink's), one batch per node and read transaction; the rest come over gRPC, verified in
        transit. `verify=False` hands co-located records' digests to the sink to check.
        """
        return self._read(list(keys), sink, verify)

    def _read(self, keys: list[bytes], sink: Sink, verify: bool,
              remote_values: list[bytes | None] | None = None) -> list[bool]:
        """read_into; with `remote_values`, records read over the network land there as they
        came (already verified, no second copy) instead of going through the sink."""
        orders, readers, local, _ = self._route(keys)
        found = [False] * len(keys)
        if local:
            count = self.local.read_into(readers, local, keys, sink, verify, found)
            with self._reads_lock:
                self.reads["colocated"] += count
            # the co-located map that answered missing (or damaged) is not asked again over gRPC
            asked = {i: node for node, idx in local.items() for i in idx}
            orders = [[n for n in owners if n != asked.get(i)] for i, owners in enumerate(orders)]
        rest = [i for i in range(len(keys)) if not found[i] and orders[i]]
        if rest:
            if remote_values is None:  # the sink takes each record as it arrives
                values: list[bytes | None] = [None] * len(keys)
                copies = {} if self.edge is not None and self.edge.local is not None else None
                self.replica_set.fetch(keys, orders, rest, values, sink, copies)
                if copies:  # what the model loaded from remote owners stays on this host's node
                    self.edge.keep(keys, [copies.get(i) for i in range(len(keys))], list(copies))
            else:
                values = remote_values
                self.replica_set.fetch(keys, orders, rest, values)
                if self.edge is not None:
                    self.edge.keep(keys, values, rest)
            for i in rest:
                found[i] = values[i] is not None
            with self._reads_lock:
                self.reads["remote"] += len(rest)
        return found

    def exists(self, keys: Sequence[bytes] | bytes) -> list[bool]:
        """Which keys are stored (one bytes key or a list). Co-located replicas answer from their map (no RPC on the hot
        path); their nodes still get a Lookup of the hits, batched in the background
        (kvclient.recency), which keeps LRU recency."""
        keys = [keys] if isinstance(keys, bytes) else list(keys)
        orders, readers, local, all_local = self._route(keys)
        present = [False] * len(keys)
        for node, idx in local.items():
            for i, p in zip(idx, readers[node].contains([keys[i] for i in idx])):
                present[i] = p
            hits = [keys[i] for i in idx if present[i]]
            if hits:
                self._touches.add(node, hits)
        # a co-located replica already answered from its map: ask only the others
        pending = [i for i in range(len(keys)) if not present[i] and not all_local[i]]
        remote = [[n for n in owners if n not in readers] for owners in orders]
        self.replica_set.present(keys, remote, pending, present)
        return present

    def lookup(self, keys: Sequence[bytes]) -> int:
        """Length of the longest prefix of `keys` that is stored (the cached prefix)."""
        return record.prefix_length(self.exists(keys))

    def stat(self) -> dict[str, dict]:
        """Per-node statistics; a node that did not answer has {"error": why}."""
        out: dict[str, dict] = {}
        for node in self.ring.nodes:
            try:
                reply = self.conn(node).stat(self.timeout)
                out[node] = {f.name: getattr(reply, f.name) for f in reply.DESCRIPTOR.fields}
            except KVCacheError as exc:
                out[node] = {"error": str(exc)}
        return out

    def health(self) -> dict[str, str]:
        """Per-node health: "SERVING", or the error that names why not."""
        out: dict[str, str] = {}
        for node in self.ring.nodes:
            try:
                out[node] = self.conn(node).health(self.timeout)
            except KVCacheError as exc:
                out[node] = f"error: {exc}"
        return out

    def _report(self, node: str, entries: list) -> None:
        """The Report call to `node`: its meter learns of reads through its map."""
        if self._market is None:
            from .market import Market  # imports this module: resolved at first use

            self._market = Market(self)
        self._market._call(node, "Report", pb.ReportRequest(entries=entries))

    def flush(self, timeout: float | None = None) -> None:
        """Finish background work started so far: read repairs, recency touches, and the
        reports of co-located reads."""
        self.replica_set.flush(timeout)
        self._touches.flush()
        self._meter.flush()
        if self.edge is not None:
            self.edge.flush(timeout)

    def close(self) -> None:
        """Stop background work (undelivered hints are dropped: ``repair`` heals later)."""
        self._touches.close()
        self._meter.close()
        if self.edge is not None:
            self.edge.close()
        self.local.close()
        self.replica_set.close()
        self.membership.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

