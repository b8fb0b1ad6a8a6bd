"""The kvcache.v1 servicer: translates between protobuf and the storage domain, nothing more.

Requests arrive as raw bytes and are parsed here, so malformed input maps to INVALID_ARGUMENT
(grpcio's own deserializer would answer INTERNAL). Every domain error maps to a status code in
``_abort`` (the one place), and no handler exception escapes as UNKNOWN.
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

from .config import ServerConfig
from .metrics import NodeMetrics
from .storage import IncomingRecord, Storage

log = logging.getLogger(__name__)


def parse(cls, raw: bytes):
    msg = cls()
    try:
        msg.ParseFromString(raw)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise InvalidArgument(f"malformed {cls.__name__}: {exc}") from exc
    return msg


def check_key(key: bytes) -> None:
    if not key:
        raise InvalidArgument("empty key")
    if len(key) > MAX_KEY_BYTES:
        raise InvalidArgument(f"key of {len(key)} bytes exceeds {MAX_KEY_BYTES}")


def check_keys(keys) -> None:
    if len(keys) > MAX_KEYS_PER_CALL:
        raise InvalidArgument(f"{len(keys)} keys in one call exceeds {MAX_KEYS_PER_CALL}")
    for key in keys:
        check_key(key)


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
    def __init__(self, config: ServerConfig, storage: Storage, metrics: NodeMetrics, auth=None) -> None:
        self.config = config
        self.storage = storage
        self.metrics = metrics
        self.auth = auth  # kvstore.auth.Authenticator or None

    def _prefix(self, context: grpc.ServicerContext) -> bytes:
        return self.auth.key_prefix(context) if self.auth else b""

    # ---- Put ---------------------------------------------------------------------------
    def put(self, request_iterator: Iterator[bytes], context: grpc.ServicerContext) -> pb.PutResponse:
        prefix = self._prefix(context)
        records: list[IncomingRecord] = []
        current: pb.PutRequest | None = None
        parts: list[bytes] = []
        got = total = 0
        for raw in request_iterator:
            msg = parse(pb.PutRequest, raw)
            if current is None:
                current, parts, got = self._start_record(msg, total), [], 0
            elif msg.key or msg.size or msg.checksum:
                raise InvalidArgument("record header arrived before the previous record was complete")
            if msg.data:
                got += len(msg.data)
                total += len(msg.data)
                if got > current.size:
                    raise InvalidArgument(f"record {current.key.hex()[:16]} has more data than its size")
                parts.append(msg.data)
            if got == current.size:
                incoming = IncomingRecord.from_parts(current.key, current.checksum, current.size, parts)
                if record.digest(current.key, incoming.payload) != current.checksum:
                    raise Corrupt(f"record {current.key.hex()[:16]} failed its checksum in transit")
                records.append(incoming)
                current = None
        if current is not None:
            raise InvalidArgument("stream ended inside a record")
        stored, existed = self.storage.put_batch(records, prefix)
        self.metrics.bytes_in.inc(total)
        return pb.PutResponse(stored=stored, existed=existed)

    def _start_record(self, msg: pb.PutRequest, total: int) -> pb.PutRequest:
        check_key(msg.key)
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
        prefix = self._prefix(context)
        request = parse(pb.GetRequest, raw)
        check_keys(request.keys)
        for index, key in enumerate(request.keys):
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
                yield wire.state_frame(index, pb.RECORD_STATE_CORRUPT)
                continue
            if found is None:
                self.metrics.misses.labels("missing").inc()
                yield wire.state_frame(index, pb.RECORD_STATE_MISSING)
                continue
            frames, size = found
            self.metrics.hits.inc()
            self.metrics.bytes_out.inc(size)
            yield from frames

    # ---- small calls -------------------------------------------------------------------
    def lookup(self, raw: bytes, context: grpc.ServicerContext) -> pb.LookupResponse:
        prefix = self._prefix(context)
        request = parse(pb.LookupRequest, raw)
        check_keys(request.keys)
        present = self.storage.exists(list(request.keys), prefix)
        run = record.prefix_length(present)
        return pb.LookupResponse(present=present, prefix_length=run)

    def delete(self, raw: bytes, context: grpc.ServicerContext) -> pb.DeleteResponse:
        prefix = self._prefix(context)
        request = parse(pb.DeleteRequest, raw)
        check_keys(request.keys)
        return pb.DeleteResponse(deleted=self.storage.delete(list(request.keys), prefix))

    def stat(self, raw: bytes, context: grpc.ServicerContext) -> pb.StatResponse:
        self._prefix(context)  # authenticated callers only
        parse(pb.StatRequest, raw)
        s = self.storage.stats()
        return pb.StatResponse(
            node_id=self.config.node_id,
            records=s.records,
            used_bytes=s.used_bytes,
            map_size_bytes=s.map_size_bytes,
            max_record_bytes=self.config.max_record_bytes,
            version="kvcache.v1",
            evicted_records=s.evicted_records,
            data_port=self.config.data_port or 0,  # build_node records the bound port
        )

    def scan(self, raw: bytes, context: grpc.ServicerContext) -> pb.ScanResponse:
        prefix = self._prefix(context)
        request = parse(pb.ScanRequest, raw)
        if len(request.start_after) > MAX_KEY_BYTES:
            raise InvalidArgument(f"start_after of {len(request.start_after)} bytes exceeds {MAX_KEY_BYTES}")
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
