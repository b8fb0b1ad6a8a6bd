"""Cluster membership in etcd: the key layout nodes and clients share, and a watched view of it.

Layout under ``/kvcache/<cluster>/`` (DESIGN §11):
- ``nodes/<id>`` → JSON {"address", "state", "host"} under the node's lease: gone when the node
  leaves or its lease expires. `state` is "joining" until the node has pulled the keys it owns
  (clients write to it but read elsewhere), then "ready".
- ``config`` → JSON {"replication", "vnodes"}: the ring's shape, written once (first node).
- ``status/<id>`` → JSON of the node's rebalancer (keys to move, moved, rate), under its lease.

``ClusterWatch`` keeps a view of that prefix current from a background thread (its own asyncio
loop, ``aetcd``): one full read, then a prefix watch; on any error it keeps the last view, says so
(log and ``connected``), reconnects with a back-off and reads everything again before watching
(a watch that missed events is resynced), and a full read every `resync_seconds` regardless.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

JOINING, READY = "joining", "ready"
CALL_SECONDS = 3.0  # every unary etcd call is bounded


class EtcdUnreachable(OSError):
    """No etcd endpoint answered."""


def parse_endpoints(spec: str) -> list[tuple[str, int]]:
    """"HOST:PORT[,HOST:PORT...]" as (host, port) pairs; ValueError naming what is wrong."""
    out = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        if "://" in part:
            part = part.split("://", 1)[1].rstrip("/")
        host, sep, port = part.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"--etcd: {part!r} is not HOST:PORT (e.g. 127.0.0.1:2379)")
        out.append((host.strip("[]"), int(port)))
    if not out:
        raise ValueError("--etcd: no endpoint given (HOST:PORT[,HOST:PORT...])")
    return out


def cluster_prefix(cluster: str) -> bytes:
    if not cluster or "/" in cluster:
        raise ValueError(f"--cluster must be a non-empty name without '/', got {cluster!r}")
    return f"/kvcache/{cluster}/".encode()


@dataclass(frozen=True)
class Member:
    id: str
    address: str
    state: str = READY
    host: str = ""

    def encode(self) -> bytes:
        return json.dumps({"address": self.address, "state": self.state, "host": self.host}).encode()

    @classmethod
    def decode(cls, node_id: str, raw: bytes) -> "Member | None":
        try:
            data = json.loads(raw)
            return cls(node_id, str(data["address"]), str(data.get("state", READY)), str(data.get("host", "")))
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring malformed member record %r", node_id)
            return None


@dataclass(frozen=True)
class ClusterView:
    members: dict[str, Member] = field(default_factory=dict)
    replication: int = 2
    vnodes: int = 128
    status: dict[str, dict] = field(default_factory=dict)
    revision: int = 0

    def addresses(self, state: str | None = None) -> list[str]:
        return sorted(m.address for m in self.members.values() if state is None or m.state == state)


def decode_config(raw: bytes | None) -> tuple[int, int]:
    try:
        data = json.loads(raw) if raw else {}
        return int(data.get("replication", 2)), int(data.get("vnodes", 128))
    except (ValueError, TypeError, AttributeError):
        log.warning("ignoring malformed cluster config %r", raw)
        return 2, 128


class EtcdLoop:
    """An asyncio loop on its own daemon thread, with one aetcd client per endpoint tried."""

    def __init__(self, endpoints: list[tuple[str, int]], name: str = "kv-etcd") -> None:
        self.endpoints = endpoints
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()
        self._client = None
        self._which = 0

    def run(self, coro: Coroutine, timeout: float | None = None):
        """Run `coro` on the loop from another thread and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def spawn(self, coro: Coroutine):
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    async def client(self):
        import aetcd

        if self._client is None:
            host, port = self.endpoints[self._which % len(self.endpoints)]
            self._client = aetcd.Client(host, port, timeout=None)
        return self._client

    async def reset(self) -> None:
        """Drop the client (after an error); the next call dials the next endpoint."""
        client, self._client = self._client, None
        self._which += 1
        if client is not None:
            try:
                await asyncio.wait_for(client.close(), 2.0)
            except Exception:  # noqa: BLE001 - a broken channel may fail to close; it is dropped anyway
                pass

    async def call(self, fn: Callable, *args, **kwargs):
        """`await fn(client, ...)` bounded by CALL_SECONDS; errors as EtcdUnreachable."""
        client = await self.client()
        try:
            return await asyncio.wait_for(fn(client, *args, **kwargs), CALL_SECONDS)
        except Exception as exc:  # noqa: BLE001 - aetcd raises its own and grpc's errors
            await self.reset()
            why = str(exc).split("; last error:")[0] or type(exc).__name__
            raise EtcdUnreachable(f"etcd at {self.describe()} unreachable: {why}") from exc

    def describe(self) -> str:
        return ",".join(f"{h}:{p}" for h, p in self.endpoints)

    def close(self) -> None:
        try:
            self.run(self.reset(), 3.0)
        except Exception:  # noqa: BLE001 - closing a loop whose etcd is gone
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=3)


class ClusterWatch:
    """The cluster's members, config and status as a ClusterView, kept current in the background."""

    def __init__(self, etcd: EtcdLoop, cluster: str, on_change: Callable[[ClusterView], None] | None = None,
                 resync_seconds: float = 10.0) -> None:
        self.etcd = etcd
        self.prefix = cluster_prefix(cluster)
        self.on_change = on_change
        self.resync_seconds = resync_seconds
        self.view = ClusterView()
        self.connected = False
        self.disconnects = 0
        self.changed_at = time.monotonic()
        self._synced = threading.Event()
        self._stopped = False
        self._task = None

    def start(self, timeout: float = 5.0) -> "ClusterWatch":
        """Read the prefix once (raises EtcdUnreachable), then watch it in the background."""
        self.etcd.run(self._resync(), timeout)
        self._task = self.etcd.spawn(self._follow())
        return self

    def _apply(self, view: ClusterView) -> None:
        if (view.members, view.replication, view.vnodes, view.status) == (
                self.view.members, self.view.replication, self.view.vnodes, self.view.status):
            self.view = view
            return
        self.view = view
        self.changed_at = time.monotonic()
        if self.on_change is not None:
            try:
                self.on_change(view)
            except Exception:  # noqa: BLE001 - a bad callback must not stop the watch
                log.exception("cluster change callback failed")

    async def _resync(self) -> None:
        reply = await self.etcd.call(lambda c: c.get_prefix(self.prefix))
        members: dict[str, Member] = {}
        status: dict[str, dict] = {}
        config = None
        for kv in reply:
            self._sort(kv.key, kv.value, members, status)
            if kv.key == self.prefix + b"config":
                config = kv.value
        replication, vnodes = decode_config(config)
        self._apply(ClusterView(members, replication, vnodes, status, reply.header.revision))
        if not self.connected:
            if self.disconnects:
                log.warning("etcd %s reachable again: membership resynced (%d nodes)", self.etcd.describe(),
                            len(members))
            self.connected = True
        self._synced.set()

    def _sort(self, key: bytes, value: bytes | None, members: dict, status: dict) -> None:
        rest = key[len(self.prefix):].decode(errors="replace")
        kind, _, name = rest.partition("/")
        if kind == "nodes" and name:
            member = Member.decode(name, value) if value is not None else None
            if member is not None:
                members[name] = member
            else:
                members.pop(name, None)
        elif kind == "status" and name:
            if value is None:
                status.pop(name, None)
            else:
                try:
                    status[name] = json.loads(value)
                except ValueError:
                    pass

    async def _follow(self) -> None:
        backoff = 0.1
        while not self._stopped:
            try:
                if not self.connected:
                    await self._resync()
                await self._watch()
                backoff = 0.1
            except asyncio.CancelledError:
                return
            except Exception as exc:  # noqa: BLE001 - keep the last view; say so; reconnect
                if self.connected:
                    self.disconnects += 1
                    log.warning("etcd %s lost (%s): keeping the last membership (%d nodes), reconnecting",
                                self.etcd.describe(), exc, len(self.view.members))
                self.connected = False
                await self.etcd.reset()
                await asyncio.sleep(backoff)
                backoff = min(2.0, backoff * 2)

    async def _watch(self) -> None:
        client = await self.etcd.client()
        watch = await asyncio.wait_for(
            client.watch_prefix(self.prefix, start_revision=self.view.revision + 1), CALL_SECONDS)
        stream = watch.__aiter__()
        try:
            while not self._stopped:
                try:
                    event = await asyncio.wait_for(stream.__anext__(), self.resync_seconds)
                except asyncio.TimeoutError:
                    await self._resync()  # quiet for a while: a full read, in case events were missed
                    continue
                except StopAsyncIteration:
                    raise EtcdUnreachable("watch ended")
                view = self.view
                members, status = dict(view.members), dict(view.status)
                replication, vnodes = view.replication, view.vnodes
                value = event.kv.value if event.kind == "PUT" else None
                if event.kv.key == self.prefix + b"config":
                    replication, vnodes = decode_config(value)
                else:
                    self._sort(event.kv.key, value, members, status)
                self._apply(ClusterView(members, replication, vnodes, status,
                                        max(view.revision, event.kv.mod_revision)))
        finally:
            try:
                await asyncio.wait_for(watch.cancel(), 1.0)
            except Exception:  # noqa: BLE001 - the stream may already be gone
                pass

    def stop(self) -> None:
        self._stopped = True
        if self._task is not None:
            self._task.cancel()
