"""Membership from etcd: the ring follows the nodes registered under the cluster's prefix.

``Client(etcd="HOST:PORT[,...]", cluster="NAME")`` (or ``kvctl --etcd``) watches
``/kvcache/NAME/`` (``kvproto.etcd.ClusterWatch``): a node that registers, leaves or whose lease
expires changes the ring within the watch's latency (milliseconds; tests hold it to 2 s).
Replication and virtual nodes come from ``config`` there. etcd lost: the last ring stays in use
(``etcd_connected`` False, logged), and a full read resyncs it on reconnect.

Reads and the "joining" state (no storm of misses after a restart): writes go to the owners of
the full ring, joining nodes included (they take their share of writes), but a key's read order
puts the owners of the ring *of ready nodes* first and joining owners last, so a node that came
back empty is not asked before the replicas that hold the data, and the previous owners of
what it now owns keep serving until it says "ready".
"""

from __future__ import annotations

import logging
import threading
import time

from kvproto.errors import Unavailable
from kvproto.etcd import READY, ClusterView, ClusterWatch, EtcdLoop, EtcdUnreachable, parse_endpoints
from kvproto.host import host_id

from .membership import Membership
from .ring import HashRing

log = logging.getLogger(__name__)


class EtcdMembership(Membership):
    def __init__(self, etcd: str, cluster: str, write_quorum: int = 1, stripe: bool = True,
                 wait: float = 5.0) -> None:
        # Membership's file/list setup does not apply: the ring comes from etcd
        self.cluster_file = None
        self._requested_quorum = write_quorum
        self.stripe = stripe
        self._lock = threading.Lock()
        self._down_until: dict[str, float] = {}
        self.cluster = cluster
        self.read_ring: HashRing | None = None
        self.joining: frozenset[str] = frozenset()
        self.local_node: str | None = None  # a ready node on this client's host (placement, edge tier)
        self.ring_changes = 0
        self._shape = None
        self._host = host_id()
        self._etcd = EtcdLoop(parse_endpoints(etcd), name=f"kvclient-etcd-{cluster}")
        self.watch = ClusterWatch(self._etcd, cluster, on_change=self._on_view)
        try:
            self.watch.start(wait)
        except (EtcdUnreachable, TimeoutError) as exc:
            self._etcd.close()
            raise Unavailable(str(exc) or f"etcd at {etcd} did not answer in {wait:g} s") from exc
        deadline = time.monotonic() + wait
        while getattr(self, "ring", None) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if getattr(self, "ring", None) is None:
            self.close()
            raise Unavailable(f"no node is registered in etcd cluster {cluster!r} ({etcd})")

    @property
    def etcd_connected(self) -> bool:
        return self.watch.connected

    @property
    def view(self) -> ClusterView:
        return self.watch.view

    def _on_view(self, view: ClusterView) -> None:
        shape = (view.members, view.replication, view.vnodes)
        if shape == self._shape:
            return
        self._shape = shape
        nodes = view.addresses()
        if not nodes:
            log.warning("etcd cluster %r has no nodes: keeping the last ring", self.cluster)
            return
        ready = view.addresses(READY)
        self.joining = frozenset(n for n in nodes if n not in ready)
        self.read_ring = HashRing(ready, view.vnodes) if ready and self.joining else None
        local = [m.address for m in view.members.values() if m.host == self._host and m.state == READY]
        self.local_node = sorted(local)[0] if local else None
        self._set_ring(HashRing(nodes, view.vnodes), view.replication)
        self.ring_changes += 1
        log.info("ring from etcd: %d nodes (%d joining), replication %d", len(nodes), len(self.joining),
                 self.replication)

    def refresh(self, force: bool = False) -> bool:
        """The watch keeps the ring current; nothing to poll."""
        return False

    def replicas(self, key: bytes, stripe: int = 0) -> list[str]:
        owners = list(self.owners(key))
        read_ring, joining = self.read_ring, self.joining
        if read_ring is not None:
            first = [n for n in read_ring.owners(key, self.replication) if n not in joining]
            owners = first + [n for n in owners if n not in first]
            serving = len(first)
        else:
            serving = len([n for n in owners if n not in joining])
        if self.stripe and serving > 1:
            shift = stripe % serving
            owners = owners[shift:serving] + owners[:shift] + owners[serving:]
        now = time.monotonic()
        return sorted(owners, key=lambda n: self._down_until.get(n, 0.0) > now)

    def close(self) -> None:
        self.watch.stop()
        self._etcd.close()


def cluster_status(membership: EtcdMembership) -> dict:
    """Members, their state and their rebalancers' progress (`kvctl status`)."""
    view = membership.view
    nodes = {}
    for member in sorted(view.members.values(), key=lambda m: m.address):
        nodes[member.address] = {"id": member.id, "state": member.state, "host": member.host,
                                 "rebalance": view.status.get(member.id, {})}
    moving = [s.get("rebalance", {}) for s in nodes.values()]
    return {
        "cluster": membership.cluster,
        "etcd_connected": membership.etcd_connected,
        "replication": view.replication,
        "vnodes": view.vnodes,
        "nodes": nodes,
        "keys_to_move": sum(int(s.get("to_move", 0)) for s in moving),
        "keys_moved": sum(int(s.get("moved", 0)) for s in moving),
        "rate_bytes_per_s": sum(float(s.get("rate_bytes_per_s", 0)) for s in moving if s.get("phase") != "idle"),
    }
