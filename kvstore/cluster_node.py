"""The node's cluster side, started beside the server: hint delivery always; with --etcd the
membership registration and the rebalancer; their Prometheus gauges.

On an auth node the agents call their peers with the cluster's peer token and work on stored
keys under the tokens file's tenant prefixes (``kvstore.auth.KeySpaces``); with --etcd the peer
token is required, without it hints are not delivered (read repair and ``kvctl repair`` heal)."""

from __future__ import annotations

import logging

from prometheus_client import Gauge

from .agent import Rebalancer
from .auth import KeySpaces
from .edge import owned_here
from .etcd_member import EtcdMember, EtcdSettings
from .hints import HintAgent
from .peers import Peers

log = logging.getLogger(__name__)


class ClusterSide:
    def __init__(self, node, settings: EtcdSettings | None, node_id: str, address: str, host: str,
                 tls_ca: bytes | None = None, peer_token: str | None = None) -> None:
        auth = node.servicer.auth
        spaces = KeySpaces.of(auth.tenants if auth is not None else None)
        if auth is not None and not peer_token:
            if settings is not None:
                raise ValueError("--etcd with --auth-tokens needs --peer-token-file FILE: the nodes copy every "
                                 "tenant's records with it")
            log.warning("auth without --peer-token-file: durable hints are not delivered (read repair and "
                        "`kvctl repair` heal tenants' records)")
            spaces = KeySpaces(frozenset())  # no credential for peers: no key space to act on
        self.peers = Peers(tls_ca, peer_token if auth is not None else None)
        self.hints = HintAgent(node.storage, self.peers, spaces=spaces)
        self.member: EtcdMember | None = None
        self.rebalancer: Rebalancer | None = None
        if settings is not None:
            self.member = EtcdMember(settings, node_id, address, host).start()  # raises if etcd is away
            self.rebalancer = Rebalancer(node.storage, self.peers, self.member, settings.rebalance_mbps * 1e6,
                                         spaces=spaces)
            reb = self.rebalancer
            node.storage.evictor.keep_first = owned_here(lambda: reb.current, address)
        self._gauges(node.metrics.registry)
        self.hints.start()
        if self.rebalancer is not None:
            self.rebalancer.start()

    def _gauges(self, r) -> None:
        Gauge("kvstore_hints_pending", "Hinted records owed to other replicas", registry=r).set_function(
            lambda: self.hints.pending)
        Gauge("kvstore_hints_delivered", "Hinted records delivered", registry=r).set_function(
            lambda: self.hints.delivered)
        if self.member is None:
            return
        member, reb = self.member, self.rebalancer
        Gauge("kvstore_etcd_connected", "1 while etcd answers the node's keepalives", registry=r).set_function(
            lambda: 1 if member.connected else 0)
        Gauge("kvstore_etcd_lost", "Times etcd was lost while serving", registry=r).set_function(lambda: member.lost)
        Gauge("kvstore_cluster_ready", "1 once the node caught up (clients read from it)", registry=r).set_function(
            lambda: 1 if member.member.state == "ready" else 0)
        Gauge("kvstore_rebalance_to_move", "Keys the current pass has to move", registry=r).set_function(
            lambda: reb.status["to_move"])
        Gauge("kvstore_rebalance_moved", "Keys the current pass moved", registry=r).set_function(
            lambda: reb.status["moved"])
        Gauge("kvstore_rebalance_moved_total", "Keys moved by the rebalancer since start", registry=r).set_function(
            lambda: reb.moved_total)
        Gauge("kvstore_rebalance_bytes_total", "Bytes moved by the rebalancer since start", registry=r).set_function(
            lambda: reb.bytes_total)
        Gauge("kvstore_rebalance_rate_bytes", "Rebalance rate of the current pass", registry=r).set_function(
            lambda: reb.status["rate_bytes_per_s"])

    def stop(self) -> None:
        """Graceful: stop moving, revoke the lease (clients drop this node now), stop hints."""
        if self.rebalancer is not None:
            self.rebalancer.stop()
        if self.member is not None:
            self.member.leave()
        self.hints.stop()
        self.peers.close()


def start_cluster_side(node, config, settings: EtcdSettings | None) -> ClusterSide:
    """The address peers and clients dial: --advertise, else the host of --listen and the bound port."""
    host = config.listen.rsplit(":", 1)[0]
    address = settings.advertise if settings is not None and settings.advertise else f"{host}:{node.port}"
    if settings is not None and host.strip("[]") in ("0.0.0.0", "::", "") and not settings.advertise:
        raise ValueError(f"--listen {config.listen} binds every interface: give --advertise HOST:PORT for etcd")
    node_id = (settings.node_id if settings is not None else "") or address
    tls_ca = None
    if config.tls_cert:
        with open(config.tls_cert, "rb") as f:
            tls_ca = f.read()  # peers present the cluster's certificate
    from kvproto.host import host_id

    return ClusterSide(node, settings, node_id, address, host_id(), tls_ca, config.peer_token)
