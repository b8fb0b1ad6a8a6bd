"""The kvcache.v1 servicer: translates between protobuf and the storage domain, nothing more.

Requests arrive as raw bytes and are parsed here, so malformed input maps to INVALID_ARGUMENT
(grpcio's own deserializer would answer INTERNAL). Every domain error maps to a status code in
``_abort`` (the one place), and no handler exception escapes as UNKNOWN.

On an auth node the cluster's peer token (``kvstore.auth``) takes Put, Get, Lookup and Scan to
the raw key space (tenant prefix ‖ key): the nodes' agents copy records with it. Those calls are
capped per address, not per tenant, and never metered (a copy is no tenant's write or load).
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable, Iterator

import grpc
from google.protobuf.message import DecodeError

from kvproto import record
from kvproto.host import host_id
from kvproto.errors import Corrupt, FailedPrecondition, InvalidArgument, KVCacheError, QuotaExceeded
from kvproto.pb import kvcache_pb2 as pb

from . import wire
from kvproto.limits import CHUNK_BYTES, MAX_KEY_BYTES, MAX_KEYS_PER_CALL

from .auth import PREFIX_BYTES
from .config import ServerConfig
from .metrics import NodeMetrics
from .spool import Spool
from .storage import Storage
from .streams import StreamGuard

log = logging.getLogger(__name__)


def parse(cls, raw: bytes):
    msg = cls()
    try:
        msg.ParseFromString(raw)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise InvalidArgument(f"malformed {cls.__name__}: {exc}") from exc
    return msg


RAW_KEY_BYTES = PREFIX_BYTES + MAX_KEY_BYTES  # a stored key, as peers name it on auth nodes


def check_key(key: bytes, limit: int = MAX_KEY_BYTES) -> None:
    if not key:
        raise InvalidArgument("empty key")
    if len(key) > limit:
        raise InvalidArgument(f"key of {len(key)} bytes exceeds {limit}")


def check_keys(keys, limit: int = MAX_KEY_BYTES) -> None:
    if len(keys) > MAX_KEYS_PER_CALL:
        raise InvalidArgument(f"{len(keys)} keys in one call exceeds {MAX_KEYS_PER_CALL}")
    for key in keys:
        check_key(key, limit)


def split_peer_key(msg: pb.PutRequest, space: bytes | None) -> bytes:
    """A peer's Put names the stored key; the record inside is the client's key (what its digest
    binds) under the tenant prefix, one tenant per stream (one transaction, one ledger owner)."""
    if len(msg.key) <= PREFIX_BYTES:
        raise InvalidArgument(f"a peer put's key is a {PREFIX_BYTES}-byte tenant prefix and a key")
    head = msg.key[:PREFIX_BYTES]
    if space is not None and head != space:
        raise InvalidArgument("a peer put stream carries one tenant's records")
    msg.key = msg.key[PREFIX_BYTES:]
    return head


def _status(exc: BaseException, context: grpc.ServicerContext) -> grpc.StatusCode:
    if isinstance(exc, KVCacheError):
        return exc.code
    if isinstance(exc, grpc.RpcError) and not context.is_active():
        return grpc.StatusCode.CANCELLED  # the client went away while we read its stream
    return grpc.StatusCode.INTERNAL


def _abort(context: grpc.ServicerContext, exc: BaseException) -> None:
    code = _status(exc, context)
    if code == grpc.StatusCode.INTERNAL:
        log.exception("unexpected error in handler")
        context.abort(code, f"internal error: {type(exc).__name__}")
    context.abort(code, str(exc) or code.name)


class KVCacheServicer:
    def __init__(self, config: ServerConfig, storage: Storage, metrics: NodeMetrics, auth=None,
                 streams: StreamGuard | None = None, market=None) -> None:
        self.config = config
        self.market = market  # kvstore.market.Market: listing keys, the meter
        self.storage = storage
        self.metrics = metrics
        if auth is not None and config.peer_token:
            auth = auth.with_peer_token(config.peer_token)
        self.auth = auth  # kvstore.auth.Authenticator or None
        self.streams = streams or config.stream_guard()

    def _prefix(self, context: grpc.ServicerContext) -> bytes:
        return self.auth.key_prefix(context) if self.auth else b""

    def _space(self, context: grpc.ServicerContext) -> bytes | None:
        """Like ``_prefix``, or None for a peer node on the raw key space (auth nodes only)."""
        return self.auth.key_space(context) if self.auth else b""

    def _tenant(self, prefix: bytes) -> bytes | None:
        """Who a stream is capped as: its tenant on an auth node, else only its address."""
        return prefix if self.auth is not None else None

    # ---- Put ---------------------------------------------------------------------------
    def put(self, request_iterator: Iterator[bytes], context: grpc.ServicerContext) -> pb.PutResponse:
        """Records arrive in chunks, wait in a spool (memory, then a file: never whole in
        memory) and commit in one transaction when the stream ends: all or nothing."""
        prefix = self._space(context)
        peer = prefix is None
        with self.streams.admit(context, "Put", None if peer else self._tenant(prefix)) as watch:
            spool = Spool(self.storage.path)
            try:
                total, space = self._receive(request_iterator, watch, spool, peer)
                prefix = (space or b"") if peer else prefix
                records = spool.records()
                writes = self.market.before_put(records, prefix) if self.market and not peer else []
                stored, existed = self.storage.put_batch(records, prefix)
                if writes:
                    self.market.record(writes)
            finally:
                spool.close()
        self.metrics.bytes_in.inc(total)
        return pb.PutResponse(stored=stored, existed=existed)

    def _receive(self, request_iterator: Iterator[bytes], watch, spool: Spool, peer: bool = False,
                 ) -> tuple[int, bytes | None]:
        """Bytes received, and (for a peer) the tenant prefix of the stream's records."""
        current: pb.PutRequest | None = None
        got = total = 0
        space = None
        for raw in request_iterator:
            watch.beat()
            msg = parse(pb.PutRequest, raw)
            if current is None:
                if peer:
                    space = split_peer_key(msg, space)
                current, got = self._start_record(msg, total), 0
                spool.begin(current.key, current.size, current.checksum)
            elif msg.key or msg.size or msg.checksum:
                raise InvalidArgument("record header arrived before the previous record was complete")
            if msg.data:
                got += len(msg.data)
                total += len(msg.data)
                if got > current.size:
                    raise InvalidArgument(f"record {current.key.hex()[:16]} has more data than its size")
                spool.data(msg.data)
            if got == current.size:
                if not spool.end():
                    raise Corrupt(f"record {current.key.hex()[:16]} failed its checksum in transit")
                current = None
        if current is not None:
            raise InvalidArgument("stream ended inside a record")
        return total, space

    def _start_record(self, msg: pb.PutRequest, total: int) -> pb.PutRequest:
        check_key(msg.key)
        if self.market is not None:
            self.market.check_writable(msg.key)
        if len(msg.checksum) != record.DIGEST_SIZE:
            raise InvalidArgument("checksum must be 16 bytes (XXH3-128 of key and payload)")
        if msg.size > self.config.max_record_bytes:
            raise QuotaExceeded(f"record of {msg.size} bytes exceeds limit {self.config.max_record_bytes}")
        if total + msg.size > self.config.max_stream_bytes:
            raise QuotaExceeded(f"put stream exceeds {self.config.max_stream_bytes} bytes")
        return pb.PutRequest(key=msg.key, size=msg.size, checksum=msg.checksum)

    # ---- Get ---------------------------------------------------------------------------
    def get(self, raw: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        """Serialized GetResponse messages (see kvstore/wire.py): one copy of each payload."""
        prefix = self._space(context)
        peer = prefix is None
        request = parse(pb.GetRequest, raw)
        check_keys(request.keys, RAW_KEY_BYTES if peer else MAX_KEY_BYTES)
        if self.storage.damaged:  # nothing is read from a file that needs a rebuild
            self.metrics.misses.labels("corrupt").inc(len(request.keys))
            yield from (wire.state_frame(i, pb.RECORD_STATE_CORRUPT) for i in range(len(request.keys)))
            return
        with self.streams.admit(context, "Get", None if peer else self._tenant(prefix)) as watch:
            # a peer reads stored keys as they are (the digest sent binds the client's key)
            resolved = [(k, b"", None) for k in request.keys] if peer else self._resolve(request.keys, prefix)
            self.check_reply_size(resolved)
            meter = self.market.meter(prefix) if self.market and not peer else None
            for index, found in enumerate(resolved):
                frames = self._record_frames(index, *found, meter) if found else self._missing(index)
                for frame in frames:
                    watch.beat()
                    yield frame
            watch.beat()
            if meter is not None:
                self.market.commit(meter)  # once the reply is sent: a node killed mid-way counted none

    def _resolve(self, keys, prefix: bytes) -> list:
        """(key, key space, listing context) per key; None where a listing key is not readable."""
        if self.market is None:
            return [(key, prefix, None) for key in keys]
        return self.market.resolve(keys, prefix)

    def _missing(self, index: int) -> list[bytes]:
        self.metrics.misses.labels("missing").inc()
        return [wire.state_frame(index, pb.RECORD_STATE_MISSING)]

    def check_reply_size(self, resolved: list) -> None:
        """A reply is bounded per call (one small request must not ask for 275 GB)."""
        keys = resolved
        if self.market is not None:
            total = self.market.sizes(resolved)
        else:
            total = self.storage.sizes([r[0] for r in resolved], resolved[0][1]) if resolved else 0
        if total > self.config.max_get_bytes:
            raise QuotaExceeded(f"a get of {len(keys)} keys would send {total} bytes, over the "
                                f"{self.config.max_get_bytes} a call may: ask for fewer keys at once")

    def _record_frames(self, index: int, key: bytes, prefix: bytes, listing=None, meter=None) -> list[bytes]:
        try:
            found = self.storage.read_with(
                key,
                lambda payload, digest: (wire.found_frames(index, payload, digest, CHUNK_BYTES), len(payload)),
                prefix,
                verify=False,  # the structure here, the digest by the reader (once per hop)
            )
        except Corrupt:
            log.warning("corrupt record %s", key.hex())
            self.metrics.misses.labels("corrupt").inc()
            return [wire.state_frame(index, pb.RECORD_STATE_CORRUPT)]
        if found is None:
            self.metrics.misses.labels("missing").inc()
            return [wire.state_frame(index, pb.RECORD_STATE_MISSING)]
        frames, size = found
        self.metrics.hits.inc()
        self.metrics.bytes_out.inc(size)
        if meter is not None:
            self.market.served(meter, listing, size)
        return frames

    # ---- small calls -------------------------------------------------------------------
    def lookup(self, raw: bytes, context: grpc.ServicerContext) -> pb.LookupResponse:
        prefix = self._space(context)
        request = parse(pb.LookupRequest, raw)
        check_keys(request.keys, RAW_KEY_BYTES if prefix is None else MAX_KEY_BYTES)
        keys = list(request.keys)
        if prefix is None:
            present = self.storage.exists(keys)
        else:
            present = self.market.exists(keys, prefix) if self.market else self.storage.exists(keys, prefix)
        run = record.prefix_length(present)
        return pb.LookupResponse(present=present, prefix_length=run)

    def delete(self, raw: bytes, context: grpc.ServicerContext) -> pb.DeleteResponse:
        prefix = self._prefix(context)
        request = parse(pb.DeleteRequest, raw)
        check_keys(request.keys)
        return pb.DeleteResponse(deleted=self.storage.delete(list(request.keys), prefix))

    def stat(self, raw: bytes, context: grpc.ServicerContext) -> pb.StatResponse:
        """The node's state; on an auth node the counts are the caller's tenant's only."""
        prefix = self._prefix(context)
        parse(pb.StatRequest, raw)
        s = self.storage.stats()
        records, used, evicted = s.records, s.used_bytes, s.evicted_records
        if self.auth is not None and not s.needs_rebuild:
            records, used, evicted = self.storage.count(prefix), self.storage.tenant_usage(prefix), 0
        return pb.StatResponse(
            node_id=self.config.node_id,
            records=records,
            used_bytes=used,
            map_size_bytes=s.map_size_bytes,
            max_record_bytes=self.config.max_record_bytes,
            version="kvcache.v1",
            evicted_records=evicted,
            data_port=self.config.data_port or 0,  # build_node records the bound port
            needs_rebuild=s.needs_rebuild,
            tenant_scoped=self.auth is not None,
        )

    def scan(self, raw: bytes, context: grpc.ServicerContext) -> pb.ScanResponse:
        prefix = self._space(context)
        limit = RAW_KEY_BYTES if prefix is None else MAX_KEY_BYTES
        prefix = prefix or b""  # a peer scans the stored keys themselves
        request = parse(pb.ScanRequest, raw)
        if len(request.start_after) > limit:
            raise InvalidArgument(f"start_after of {len(request.start_after)} bytes exceeds {limit}")
        limit = min(request.limit or 10_000, MAX_KEYS_PER_CALL)
        keys = self.storage.scan(prefix, prefix + request.start_after if request.start_after else b"", limit + 1)
        return pb.ScanResponse(keys=[k[len(prefix):] for k in keys[:limit]], more=len(keys) > limit)

    def local_info(self, raw: bytes, context: grpc.ServicerContext) -> pb.LocalInfoResponse:
        prefix = self._prefix(context)
        parse(pb.LocalInfoRequest, raw)
        allowed = self.config.colocated if self.config.colocated is not None else self.auth is None
        if not allowed:
            # whoever can read data.mdb reads every tenant: with auth on, only on explicit opt-in
            raise FailedPrecondition("the co-located path is off on this node (--colocated to allow)")
        if self.storage.damaged:
            raise FailedPrecondition(f"the node's files need a rebuild ({self.storage.damaged}): read over gRPC")
        return pb.LocalInfoResponse(
            node_id=self.config.node_id,
            data_path=self.storage.path,
            host_id=host_id(),
            env_token=self.storage.env_token,
            key_prefix=prefix,
            pid=os.getpid(),
        )


def instrumented(method: str, fn: Callable, metrics: NodeMetrics, streaming: bool) -> Callable:
    """Wrap a handler: map every error to a status, count requests and latency."""

    def finish(start: float, exc: BaseException | None, context: grpc.ServicerContext) -> None:
        code = "OK" if exc is None else _status(exc, context).name
        metrics.requests.labels(method, code).inc()
        metrics.latency.labels(method).observe(time.perf_counter() - start)

    if streaming:

        @functools.wraps(fn)
        def stream_handler(request, context):
            start = time.perf_counter()
            try:
                yield from fn(request, context)
            except Exception as exc:  # noqa: BLE001 - every error becomes a status
                finish(start, exc, context)
                _abort(context, exc)
            finish(start, None, context)

        return stream_handler

    @functools.wraps(fn)
    def unary_handler(request, context):
        start = time.perf_counter()
        try:
            reply = fn(request, context)
        except Exception as exc:  # noqa: BLE001 - every error becomes a status
            finish(start, exc, context)
            _abort(context, exc)
        finish(start, None, context)
        return reply

    return unary_handler
