"""A node's membership in etcd: register under the cluster prefix with a lease, keep it alive.

`kvstore serve --etcd HOST:PORT[,...] --cluster NAME` puts ``nodes/<id>`` (address, state, host)
under a lease of `ttl` seconds and refreshes it every ttl/3. A node that stops gracefully revokes
its lease (clients drop it at once); a killed one drops out when the lease expires. etcd lost
while serving: the node goes on serving, says so (log, ``kvstore_etcd_connected 0``), and
re-registers (a new lease if the old one expired) as soon as etcd answers again.

The first node of a cluster writes ``config`` (replication, vnodes) if absent; later ones keep
what is there. A node id already registered by another address is refused (one line, exit 2).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from dataclasses import dataclass

from kvproto.etcd import JOINING, READY, ClusterView, ClusterWatch, EtcdLoop, EtcdUnreachable, Member, cluster_prefix, parse_endpoints

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EtcdSettings:
    """The cluster flags of `kvstore serve` (one frozen value, passed down)."""

    endpoints: str
    cluster: str = "default"
    ttl: int = 5
    replication: int = 2
    vnodes: int = 128
    advertise: str | None = None  # HOST:PORT clients dial; default: the host of --listen, the bound port
    rebalance_mbps: float = 200.0  # the rebalancer's cap, MB/s
    node_id: str = ""  # --node-id; default: the advertised address


class EtcdMember:
    def __init__(self, settings: EtcdSettings, node_id: str, address: str, host: str) -> None:
        self.settings = settings
        self.prefix = cluster_prefix(settings.cluster)
        self.etcd = EtcdLoop(parse_endpoints(settings.endpoints), name=f"kv-etcd-{node_id}")
        self.node_id = node_id
        self.member = Member(node_id, address, JOINING, host)
        self.key = self.prefix + b"nodes/" + node_id.encode()
        self.connected = False
        self.lost = 0  # times etcd was lost while serving
        self.watch = ClusterWatch(self.etcd, settings.cluster)
        self._lease = None
        self._lock = threading.Lock()
        self._keepalive = None
        self._stopped = False

    # ---- start ----------------------------------------------------------------------------
    def start(self, timeout: float = 10.0) -> "EtcdMember":
        """Read the cluster, register (raises EtcdUnreachable or ValueError), keep the lease alive."""
        try:
            self.watch.start(timeout)
            others = [m for m in self.watch.view.members.values() if m.id != self.node_id and m.state == READY]
            state = JOINING if others else READY  # the first node has nothing to catch up on
            self.member = Member(self.node_id, self.member.address, state, self.member.host)
            self.etcd.run(self._register(claim=True), timeout)
        except BaseException:
            self.close()
            raise
        self.connected = True
        self._keepalive = self.etcd.spawn(self._keep_alive())
        log.info("registered in etcd %s cluster %r as %r (%s, %s)", self.etcd.describe(), self.settings.cluster,
                 self.node_id, self.member.address, self.member.state)
        return self

    async def _register(self, claim: bool = False) -> None:
        if claim:
            existing = await self.etcd.call(lambda c: c.get(self.key))
            if existing is not None:
                other = Member.decode(self.node_id, existing.value)
                if other is not None and other.address != self.member.address:
                    raise ValueError(f"node id {self.node_id!r} is already registered in cluster "
                                     f"{self.settings.cluster!r} by {other.address} (give --node-id a unique name)")
            config = json.dumps({"replication": self.settings.replication, "vnodes": self.settings.vnodes}).encode()
            key = self.prefix + b"config"
            await self.etcd.call(lambda c: c.transaction(compare=[c.transactions.version(key) == 0],
                                                         success=[c.transactions.put(key, config)], failure=[]))
        lease = await self.etcd.call(lambda c: c.lease(self.settings.ttl))
        await self.etcd.call(lambda c: c.put(self.key, self.member.encode(), lease=lease))
        self._lease = lease

    async def _keep_alive(self) -> None:
        period = max(0.2, self.settings.ttl / 3)
        while not self._stopped:
            await asyncio.sleep(period if self.connected else min(period, 0.5))
            try:
                reply = await self.etcd.call(lambda c: c.refresh_lease(self._lease.id)) if self._lease else None
                if reply is None or reply.TTL <= 0:  # expired while we were cut off: a new lease
                    await self._register()
                    log.warning("etcd lease of %r expired: registered again (%s)", self.node_id, self.member.state)
                if not self.connected:
                    log.warning("etcd %s reachable again: %r is registered", self.etcd.describe(), self.node_id)
                self.connected = True
            except asyncio.CancelledError:
                return
            except EtcdUnreachable as exc:
                if self.connected:
                    self.lost += 1
                    log.warning("etcd lost while serving (%s): serving on, reconnecting", exc)
                self.connected = False

    # ---- while serving --------------------------------------------------------------------
    @property
    def view(self) -> ClusterView:
        return self.watch.view

    def set_state(self, state: str) -> None:
        """Say "ready" once caught up (clients then read from this node)."""
        self.member = Member(self.node_id, self.member.address, state, self.member.host)
        self.etcd.run(self._put(self.key, self.member.encode()), 10.0)
        log.info("%r is %s", self.node_id, state)

    def publish_status(self, status: dict) -> None:
        """The rebalancer's progress under status/<id> (kvctl status); dropped if etcd is away."""
        try:
            self.etcd.run(self._put(self.prefix + b"status/" + self.node_id.encode(), json.dumps(status).encode()), 5.0)
        except (EtcdUnreachable, TimeoutError) as exc:
            log.debug("status not published: %s", exc)

    async def _put(self, key: bytes, value: bytes) -> None:
        lease = self._lease
        await self.etcd.call(lambda c: c.put(key, value, lease=lease))

    # ---- stop -----------------------------------------------------------------------------
    def leave(self) -> None:
        """Graceful leave: revoke the lease, so clients drop this node now, not at expiry."""
        self._stopped = True
        if self._keepalive is not None:
            self._keepalive.cancel()
        lease = self._lease
        if lease is not None:
            try:
                self.etcd.run(self.etcd.call(lambda c: c.revoke_lease(lease.id)), 5.0)
                log.info("left cluster %r (lease revoked)", self.settings.cluster)
            except (EtcdUnreachable, TimeoutError) as exc:
                log.warning("could not revoke the etcd lease (it expires in %d s): %s", self.settings.ttl, exc)
        self.close()

    def close(self) -> None:
        self._stopped = True
        self.watch.stop()
        self.etcd.close()
