"""The kvcache.v1 servicer: translates between protobuf and the storage domain, nothing more.

Requests arrive as raw bytes and are parsed here, so malformed input maps to INVALID_ARGUMENT
(grpcio's own deserializer would answer INTERNAL). Every domain error maps to a status code in
``_abort`` (the one place), and no handler exception escapes as UNKNOWN. Whom a call acts for
(a tenant, or a peer node with the cluster's peer token) is ``kvstore.callers``; a Put stream's
records are received by ``kvstore.put_stream``.
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
from kvproto.limits import CHUNK_BYTES, MAX_KEYS_PER_CALL
from kvproto.pb import kvcache_pb2 as pb

from . import wire
from .callers import ANYONE, PEER, Caller, check_keys
from .config import ServerConfig
from .metrics import NodeMetrics
from .put_stream import receive
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

    def _caller(self, context: grpc.ServicerContext) -> Caller:
        """A tenant (or anyone, without auth), or a peer node: for the calls peers may make."""
        if self.auth is None:
            return ANYONE
        prefix = self.auth.key_space(context)
        return PEER if prefix is None else Caller(prefix, capped_as=prefix)

    def _market(self, caller: Caller):
        return None if caller.peer else self.market  # a peer's copy is no tenant's write or load

    # ---- Put ---------------------------------------------------------------------------
    def put(self, request_iterator: Iterator[bytes], context: grpc.ServicerContext) -> pb.PutResponse:
        """Records arrive in chunks, wait in a spool (memory, then a file: never whole in
        memory) and commit in one transaction when the stream ends: all or nothing."""
        caller = self._caller(context)
        market = self._market(caller)
        with self.streams.admit(context, "Put", caller.capped_as) as watch:
            spool = Spool(self.storage.path)
            try:
                messages = (parse(pb.PutRequest, raw) for raw in request_iterator)
                total, space = receive(messages, watch, spool, self.config, self.market, caller.peer)
                prefix = (space or b"") if caller.peer else caller.prefix
                records = spool.records()
                writes = market.before_put(records, prefix) if market else []
                stored, existed = self.storage.put_batch(records, prefix)
                if writes:
                    market.record(writes)
            finally:
                spool.close()
        self.metrics.bytes_in.inc(total)
        return pb.PutResponse(stored=stored, existed=existed)

    # ---- Get ---------------------------------------------------------------------------
    def get(self, raw: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        """Serialized GetResponse messages (see kvstore/wire.py): one copy of each payload."""
        caller = self._caller(context)
        request = parse(pb.GetRequest, raw)
        check_keys(request.keys, caller.key_limit)
        if self.storage.damaged:  # nothing is read from a file that needs a rebuild
            self.metrics.misses.labels("corrupt").inc(len(request.keys))
            yield from (wire.state_frame(i, pb.RECORD_STATE_CORRUPT) for i in range(len(request.keys)))
            return
        market = self._market(caller)
        with self.streams.admit(context, "Get", caller.capped_as) as watch:
            # (key, key space, listing) per key, None where a listing key is not readable; a peer
            # reads stored keys as they are (the digest sent binds the client's key)
            resolved = market.resolve(request.keys, caller.prefix) if market else [
                (key, caller.prefix, None) for key in request.keys]
            self.check_reply_size(resolved)
            meter = market.meter(caller.prefix) if market else None
            for index, found in enumerate(resolved):
                frames = self._record_frames(index, *found, meter) if found else self._missing(index)
                for frame in frames:
                    watch.beat()
                    yield frame
            watch.beat()
            if meter is not None:
                self.market.commit(meter)  # once the reply is sent: a node killed mid-way counted none

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
        caller = self._caller(context)
        request = parse(pb.LookupRequest, raw)
        check_keys(request.keys, caller.key_limit)
        keys, market = list(request.keys), self._market(caller)
        present = market.exists(keys, caller.prefix) if market else self.storage.exists(keys, caller.prefix)
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
        caller = self._caller(context)
        prefix = caller.prefix  # b"" for a peer: it scans the stored keys themselves
        request = parse(pb.ScanRequest, raw)
        if len(request.start_after) > caller.key_limit:
            raise InvalidArgument(f"start_after of {len(request.start_after)} bytes exceeds {caller.key_limit}")
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
