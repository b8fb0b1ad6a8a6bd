"""Node-to-node calls for the node's own agents (hints, rebalancing): Put, Get, Lookup, Scan.

kvstore does not import kvclient (the import graph runs one way), so the few calls a node makes
to its peers are here, over the kvproto stubs: no hedging, no data plane, no co-located reads;
one deadline per call, and every failure a ``KVCacheError`` naming the peer.

On auth clusters every call carries the cluster's peer token (``kvstore.auth``) and names stored
keys (the 16-byte tenant prefix ‖ the client's key); a record's digest binds the client's key,
so that is what is digested and checked, and a Put stream carries one tenant's records.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator, Sequence

import grpc

from kvproto import record
from kvproto.errors import Corrupt, from_rpc_error
from kvproto.framing import put_messages
from kvproto.limits import grpc_channel_options
from kvproto.pb import SERVICE_NAME, kvcache_pb2 as pb

from .auth import PREFIX_BYTES


def _put_messages(items: Sequence[tuple[bytes, bytes | memoryview]], prefix_bytes: int) -> Iterator[bytes]:
    for key, value in items:
        yield from put_messages(key, value, record.digest(key[prefix_bytes:], value))


class Peer:
    """One peer node's channel (plaintext, or TLS verified against `tls_ca`)."""

    def __init__(self, address: str, tls_ca: bytes | None = None, token: str | None = None) -> None:
        self.address = address
        self.prefix_bytes = PREFIX_BYTES if token else 0  # the peer token names stored keys
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        options = grpc_channel_options()
        self.channel = (grpc.secure_channel(address, grpc.ssl_channel_credentials(tls_ca), options)
                        if tls_ca else grpc.insecure_channel(address, options))
        path = f"/{SERVICE_NAME}/"
        ser = lambda m: m.SerializeToString()  # noqa: E731
        self._put = self.channel.stream_unary(path + "Put", None, pb.PutResponse.FromString)
        self._get = self.channel.unary_stream(path + "Get", ser, pb.GetResponse.FromString)
        self._lookup = self.channel.unary_unary(path + "Lookup", ser, pb.LookupResponse.FromString)
        self._scan = self.channel.unary_unary(path + "Scan", ser, pb.ScanResponse.FromString)

    def _rpc(self, fn, request, timeout: float):
        try:
            return fn(request, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as err:
            raise from_rpc_error(err, self.address) from None

    def put(self, items: Sequence[tuple[bytes, bytes | memoryview]], timeout: float) -> int:
        """Store records, one stream (one transaction there) per tenant; how many were new."""
        tenant = lambda item: item[0][: self.prefix_bytes]  # noqa: E731
        return sum(self._rpc(self._put, _put_messages(list(group), self.prefix_bytes), timeout).stored
                   for _, group in itertools.groupby(sorted(items, key=tenant), key=tenant))

    def lookup(self, keys: Sequence[bytes], timeout: float) -> list[bool]:
        return list(self._rpc(self._lookup, pb.LookupRequest(keys=list(keys)), timeout).present)

    def scan(self, start_after: bytes, limit: int, timeout: float) -> tuple[list[bytes], bool]:
        reply = self._rpc(self._scan, pb.ScanRequest(start_after=start_after, limit=limit), timeout)
        return list(reply.keys), reply.more

    def scan_all(self, timeout: float) -> list[bytes]:
        keys: list[bytes] = []
        start = b""
        while True:
            page, more = self.scan(start, 10_000, timeout)
            keys.extend(page)
            if not more or not page:
                return keys
            start = page[-1]

    def get(self, keys: Sequence[bytes], timeout: float) -> list[bytes | None]:
        """Verified payloads in key order (None: missing or damaged there)."""
        out: list[bytes | None] = [None] * len(keys)
        parts: list[bytes] = []
        head = None
        try:
            for msg in self._get(pb.GetRequest(keys=list(keys)), timeout=timeout, metadata=self._metadata):
                if msg.index >= len(keys):
                    raise Corrupt(f"{self.address}: reply for key {msg.index} of a request of {len(keys)}")
                if msg.state != pb.RECORD_STATE_FOUND:
                    continue
                if head is None:
                    head, parts = msg, []
                parts.append(msg.data)
                if msg.last:
                    value = b"".join(parts)
                    digest = record.digest(keys[head.index][self.prefix_bytes :], value)
                    if len(value) == head.size and digest == head.checksum:
                        out[head.index] = value
                    head = None
        except grpc.RpcError as err:
            raise from_rpc_error(err, self.address) from None
        return out

    def close(self) -> None:
        self.channel.close()


class Peers:
    """Channels to the cluster's other nodes, made on first use."""

    def __init__(self, tls_ca: bytes | None = None, token: str | None = None) -> None:
        self._tls_ca = tls_ca
        self._token = token
        self._peers: dict[str, Peer] = {}
        self._lock = threading.Lock()

    def __call__(self, address: str) -> Peer:
        with self._lock:
            peer = self._peers.get(address)
            if peer is None:
                peer = self._peers[address] = Peer(address, self._tls_ca, self._token)
            return peer

    def close(self) -> None:
        with self._lock:
            peers, self._peers = list(self._peers.values()), {}
        for peer in peers:
            peer.close()
