"""One node's connection: typed calls over a gRPC channel, errors translated to the library's."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import grpc

from kvproto import record
from kvproto.errors import Corrupt, KVCacheError, from_rpc_error
from kvproto.framing import put_messages
from kvproto.limits import grpc_channel_options
from kvproto.pb import SERVICE_NAME, kvcache_pb2 as pb

from .dataplane import CannotConnect, DataPool, client_ssl_context

log = logging.getLogger(__name__)

DATA_PLANE_RETRY_SECONDS = 30.0  # after a failed Stat or connect, stay on gRPC this long
CHANNEL_OPTIONS = [
    *grpc_channel_options(),
    ("grpc.enable_retries", 1),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


# (text in gRPC's error, what it means and what to do), first match wins
CAUSES = (
    ("Connection refused", "connection refused: nothing listens at {node} (is the node running, and is this its port?)"),
    ("Hostname Verification", "TLS: the node's certificate does not name {host}: issue one whose subjectAltName "
                              "has it (README, \"TLS\": openssl ... -addext subjectAltName=IP:{host})"),
    ("CERTIFICATE_VERIFY_FAILED", "TLS: the node's certificate is not signed by the CA given (--tls-ca / tls_ca=)"),
    ("WRONG_VERSION_NUMBER", "TLS was asked for but the node at {node} speaks plaintext (drop --tls-ca / tls_ca=)"),
    ("Socket closed", "the node at {node} closed the connection at once: if it serves TLS, pass its CA "
                      "(--tls-ca / tls_ca=)"),
    ("Domain name not found", "cannot resolve the host of {node}"),
    ("Deadline Exceeded", "no answer in time from {node} (is the node hung or overloaded?)"),
)


def explain(exc: KVCacheError, node: str) -> KVCacheError:
    """Put the cause and what to do first in the message; the gRPC text stays after it."""
    text = str(exc)
    host = node.rsplit(":", 1)[0].strip("[]")
    for needle, cause in CAUSES:
        if needle in text:
            explained = type(exc)(f"{node}: {cause.format(node=node, host=host)} [{text.split(': ', 1)[-1]}]")
            explained.code = exc.code
            return explained
    return exc


@dataclass(frozen=True)
class Credentials:
    token: str | None = None
    tls_ca: bytes | None = None


class NodeConnection:
    """Calls to one node. Every call carries a deadline; failures raise KVCacheError subclasses."""

    def __init__(self, address: str, creds: Credentials = Credentials()) -> None:
        self.address = address
        self._creds = creds
        self._data: DataPool | None = None  # the node's data plane, once Stat named its port
        self._data_retry_at = 0.0  # monotonic time before which reads stay on gRPC
        self._data_lock = threading.Lock()
        if creds.tls_ca is not None:
            self.channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(creds.tls_ca), CHANNEL_OPTIONS)
        else:
            self.channel = grpc.insecure_channel(address, CHANNEL_OPTIONS)
        self.metadata = (("authorization", f"Bearer {creds.token}"),) if creds.token else None
        ser = lambda m: m.SerializeToString()  # noqa: E731
        path = f"/{SERVICE_NAME}/"
        self._put = self.channel.stream_unary(path + "Put", None, pb.PutResponse.FromString)  # pre-serialized
        self._get = self.channel.unary_stream(path + "Get", ser, pb.GetResponse.FromString)
        self._lookup = self.channel.unary_unary(path + "Lookup", ser, pb.LookupResponse.FromString)
        self._delete = self.channel.unary_unary(path + "Delete", ser, pb.DeleteResponse.FromString)
        self._stat = self.channel.unary_unary(path + "Stat", ser, pb.StatResponse.FromString)
        self._scan = self.channel.unary_unary(path + "Scan", ser, pb.ScanResponse.FromString)
        self._local_info = self.channel.unary_unary(path + "LocalInfo", ser, pb.LocalInfoResponse.FromString)

    def _call(self, fn, request, timeout: float):
        try:
            return fn(request, timeout=timeout, metadata=self.metadata)
        except grpc.RpcError as err:
            raise explain(from_rpc_error(err, self.address), self.address) from None

    def put(self, items: Sequence[tuple[bytes, bytes | memoryview]], timeout: float,
            digests: Sequence[bytes] | None = None) -> pb.PutResponse:
        """Store records in one stream: one transaction on the node, all or nothing. `digests`
        (kvproto.record.digest of each item) lets a caller writing R replicas hash once."""
        if digests is None:
            digests = [record.digest(key, value) for key, value in items]
        requests = (msg for (key, value), digest in zip(items, digests) for msg in put_messages(key, value, digest))
        return self._call(self._put, requests, timeout)

    def _data_pool(self, timeout: float) -> DataPool | None:
        """The data plane's connections, learned by one Stat call (cached); None: use gRPC."""
        with self._data_lock:
            if self._data is not None or time.monotonic() < self._data_retry_at:
                return self._data
            try:
                port = self.stat(min(timeout, 5.0)).data_port
                host = self.address.rsplit(":", 1)[0].strip("[]")
            except (KVCacheError, ValueError) as exc:
                log.debug("%s: no data plane (%s); reads over gRPC", self.address, exc)
                port = 0
            if not port:
                self._data_retry_at = time.monotonic() + DATA_PLANE_RETRY_SECONDS
                return None
            tls = client_ssl_context(self._creds.tls_ca) if self._creds.tls_ca is not None else None
            self._data = DataPool(host, port, self._creds.token, tls, node=self.address)
            return self._data

    def _forget_data_plane(self, pool: DataPool) -> None:
        with self._data_lock:
            if self._data is pool:
                self._data = None
                self._data_retry_at = time.monotonic() + DATA_PLANE_RETRY_SECONDS
        pool.close()

    def get(self, keys: Sequence[bytes], timeout: float, reuse: bool = False) -> Iterator[tuple[int, bytes | None, bool]]:
        """Yield (index, value or None, corrupt) per key, in order, as each record completes.

        Over the node's data plane when it has one (values are then bytearrays; with `reuse`
        views of one receive buffer, valid until the next value), else gRPC."""
        deadline = time.monotonic() + timeout  # the Stat that finds the data plane counts too
        pool = self._data_pool(timeout)
        timeout = max(0.001, deadline - time.monotonic())
        if pool is not None:
            try:
                entries = pool.get(keys, timeout, reuse)
            except CannotConnect as exc:
                log.info("%s: data plane unreachable (%s); reading over gRPC", self.address, exc)
                self._forget_data_plane(pool)
                timeout = max(0.001, deadline - time.monotonic())
            else:
                yield from entries
                return
        yield from self._grpc_get(keys, timeout)

    def _grpc_get(self, keys: Sequence[bytes], timeout: float) -> Iterator[tuple[int, bytes | None, bool]]:
        try:
            stream = self._get(pb.GetRequest(keys=list(keys)), timeout=timeout, metadata=self.metadata)
            parts: list[bytes] = []
            head: pb.GetResponse | None = None
            for msg in stream:
                if msg.index >= len(keys):
                    raise Corrupt(f"{self.address}: reply for key {msg.index} of a request of {len(keys)}")
                if msg.state != pb.RECORD_STATE_FOUND:
                    yield msg.index, None, msg.state == pb.RECORD_STATE_CORRUPT
                    continue
                if head is None:
                    head, parts = msg, []
                parts.append(msg.data)
                if msg.last:
                    value = b"".join(parts)
                    ok = len(value) == head.size and record.digest(keys[head.index], value) == head.checksum
                    yield head.index, (value if ok else None), not ok
                    head = None
        except grpc.RpcError as err:
            raise explain(from_rpc_error(err, self.address), self.address) from None

    def health(self, timeout: float) -> str:
        """The node's gRPC health status name (SERVING when it takes requests)."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self.channel)
        reply = self._call(stub.Check, health_pb2.HealthCheckRequest(service=""), timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def lookup(self, keys: Sequence[bytes], timeout: float) -> list[bool]:
        return list(self._call(self._lookup, pb.LookupRequest(keys=list(keys)), timeout).present)

    def delete(self, keys: Sequence[bytes], timeout: float) -> int:
        return self._call(self._delete, pb.DeleteRequest(keys=list(keys)), timeout).deleted

    def stat(self, timeout: float) -> pb.StatResponse:
        return self._call(self._stat, pb.StatRequest(), timeout)

    def scan(self, start_after: bytes, limit: int, timeout: float) -> tuple[list[bytes], bool]:
        reply = self._call(self._scan, pb.ScanRequest(start_after=start_after, limit=limit), timeout)
        return list(reply.keys), reply.more

    def local_info(self, timeout: float) -> pb.LocalInfoResponse:
        return self._call(self._local_info, pb.LocalInfoRequest(), timeout)

    def close(self) -> None:
        with self._data_lock:
            pool, self._data = self._data, None
        if pool is not None:
            pool.close()
        self.channel.close()

