"""The data plane of a node: record bytes for reads over a plain TCP socket, next to gRPC.

Python gRPC tops out near 0.5 GB/s on 1 MiB messages; a socket that sends LMDB's memory map
with ``sendmsg`` (no Python-side copy) runs near memory speed. gRPC keeps lookup, put, auth and
placement; the node advertises this port in ``StatResponse.data_port``. The wire format is
``kvproto.dataplane`` (its docstring has the protocol).
"""

from __future__ import annotations

import logging
import socket
import ssl
import struct
import threading
import time

import grpc

from kvproto.errors import Corrupt, InvalidArgument, KVCacheError, Unauthenticated
from kvproto.dataplane import CODE, CORRUPT, ENTRY, ERROR, FOUND, GET, HEADER, HELLO, MAGIC, MISSING, OK, VERSION, tune
from kvproto.limits import MAX_KEY_BYTES, MAX_KEYS_PER_CALL

from .auth import Authenticator, tenant_prefix
from .metrics import NodeMetrics
from .servicer import check_keys
from .storage import Storage

log = logging.getLogger(__name__)

MAX_TOKEN_BYTES = 4096
MAX_KEY_BLOB = MAX_KEYS_PER_CALL * MAX_KEY_BYTES
HELLO_SECONDS = 10.0  # a client that connects must say who it is soon
IDLE_SECONDS = 600.0  # a pooled connection may wait this long between requests
SEND_SECONDS = 60.0  # a client that stops reading releases its read transaction after this
_NO_DIGEST = bytes(16)


class ProtocolError(Exception):
    """Input that breaks the framing: answered, logged, and the connection closed."""


def _recv_exact(sock: socket.socket, n: int, idle: bool = False) -> bytearray | None:
    """n bytes; None if `idle` and the peer closed before the first byte (a clean goodbye)."""
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            if idle and got == 0:
                return None
            raise ProtocolError(f"connection closed inside a frame ({got} of {n} bytes)")
        got += k
    return buf


def _error_frame(code: grpc.StatusCode, message: str) -> bytes:
    text = message.encode()[:4096]
    return HEADER.pack(MAGIC, ERROR, 0, VERSION, len(text)) + CODE.pack(code.value[0]) + text


class _Sender:
    """Small frames wait in `pending` and leave with the next payload in one sendmsg (writev)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.vectored = not isinstance(sock, ssl.SSLSocket)  # SSL sockets have no sendmsg
        self.pending = bytearray()

    def send(self, payload: memoryview) -> None:
        parts = [self.pending, payload]
        self.pending = bytearray()
        if not self.vectored:
            for part in parts:
                self.sock.sendall(part)
            return
        sent = self.sock.sendmsg(parts)
        for part in parts:
            if sent >= len(part):
                sent -= len(part)
                continue
            self.sock.sendall(memoryview(part)[sent:])  # the socket took part of it
            sent = 0

    def flush(self) -> None:
        if self.pending:
            self.sock.sendall(self.pending)
            self.pending = bytearray()


class DataPlane:
    """The data-plane listener of one node: start() binds, stop() cuts every connection."""

    def __init__(self, storage: Storage, metrics: NodeMetrics, auth: Authenticator | None = None,
                 ssl_context: ssl.SSLContext | None = None, max_connections: int = 64,
                 max_get_bytes: int = 4 << 30) -> None:
        self.max_get_bytes = max_get_bytes
        self.storage = storage
        self.metrics = metrics
        self.auth = auth
        self.ssl_context = ssl_context
        self.max_connections = max_connections
        self.market = None  # kvstore.market.Market (set by build_node): listing keys, the meter
        self.port = 0
        self._listener: socket.socket | None = None
        self._accepting: threading.Thread | None = None
        self._lock = threading.Lock()
        self._conns: dict[socket.socket, threading.Thread] = {}
        self._stopping = False

    def start(self, host: str, port: int = 0) -> int:
        self._listener = socket.create_server((host, port), family=_family(host), backlog=64)
        self.port = self._listener.getsockname()[1]
        self._accepting = threading.Thread(target=self._accept_loop, name=f"dataplane-{self.port}", daemon=True)
        self._accepting.start()
        log.info("data plane listening on %s:%d", host, self.port)
        return self.port

    def stop(self, timeout: float = 10.0) -> None:
        """Close the listener and every connection; wait for the handlers (they hold LMDB
        transactions, which must end before the environment closes)."""
        with self._lock:
            self._stopping = True
            conns = list(self._conns.items())
        if self._listener is not None:
            _shutdown(self._listener)
            self._listener.close()
        for sock, _ in conns:
            _shutdown(sock)
        end = time.monotonic() + timeout
        for _, thread in conns:
            thread.join(max(0.0, end - time.monotonic()))
        if self._accepting is not None:
            self._accepting.join(max(0.0, end - time.monotonic()))

    def _accept_loop(self) -> None:
        while True:
            try:
                sock, peer = self._listener.accept()
            except OSError:
                return  # the listener was closed
            with self._lock:
                if self._stopping:
                    sock.close()
                    return
                if len(self._conns) >= self.max_connections:
                    log.warning("data plane: refusing %s beyond %d connections", peer, self.max_connections)
                    _answer_and_close(sock, grpc.StatusCode.RESOURCE_EXHAUSTED, "too many data connections")
                    continue
                thread = threading.Thread(target=self._serve, args=(sock, peer), daemon=True,
                                          name=f"dataplane-conn-{self.port}")
                self._conns[sock] = thread
            thread.start()

    # ---- one connection ------------------------------------------------------------------
    def _serve(self, raw: socket.socket, peer) -> None:
        sock = raw
        try:
            tune(raw)
            raw.settimeout(HELLO_SECONDS)
            if self.ssl_context is not None:
                sock = self.ssl_context.wrap_socket(raw, server_side=True)
            prefix = self._hello(sock)
            while True:
                sock.settimeout(IDLE_SECONDS)
                if not self._request(sock, prefix):
                    return  # the client closed between requests
        except ProtocolError as exc:
            log.warning("data plane: closing %s: %s", peer, exc)
            _answer_quietly(sock, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except KVCacheError as exc:  # refused HELLO
            log.warning("data plane: refusing %s: %s", peer, exc)
            _answer_quietly(sock, exc.code, str(exc))
        except (OSError, ssl.SSLError) as exc:  # the peer went away, a timeout, stop()
            log.debug("data plane: connection %s ended: %s", peer, exc)
        except Exception:  # noqa: BLE001 - a bug ends this connection, never the node
            log.exception("data plane: unexpected error serving %s", peer)
            self.metrics.requests.labels("DataGet", "INTERNAL").inc()
            _answer_quietly(sock, grpc.StatusCode.INTERNAL, "internal error")
        finally:
            with self._lock:
                self._conns.pop(raw, None)
            sock.close()

    def _read_header(self, sock: socket.socket, expect: int, idle: bool = False) -> int | None:
        raw = _recv_exact(sock, HEADER.size, idle)
        if raw is None:
            return None
        magic, op, flags, version, n = HEADER.unpack(raw)
        if magic != MAGIC:
            raise ProtocolError(f"bad magic {bytes(magic)!r}")
        if version != VERSION or flags != 0:
            raise ProtocolError(f"unsupported version {version} (flags {flags}); this node speaks {VERSION}")
        if op != expect:
            raise ProtocolError(f"unexpected op {op} (wanted {expect})")
        return n

    def _hello(self, sock: socket.socket) -> bytes:
        n = self._read_header(sock, HELLO)
        if n > MAX_TOKEN_BYTES:
            raise ProtocolError(f"token of {n} bytes exceeds {MAX_TOKEN_BYTES}")
        token = bytes(_recv_exact(sock, n)).decode("utf-8", errors="replace").strip()
        prefix = b""
        if self.auth is not None:
            tenant = self.auth.tenant_of(token) if token else None
            if tenant is None:
                raise Unauthenticated("missing bearer token" if not token else "unknown token")
            prefix = tenant_prefix(tenant)
        sock.sendall(HEADER.pack(MAGIC, OK, 0, VERSION, 0))
        return prefix

    def _request(self, sock: socket.socket, prefix: bytes) -> bool:
        """Read one GET and answer it; False when the client closed instead."""
        count = self._read_header(sock, GET, idle=True)
        if count is None:
            return False
        if count > MAX_KEYS_PER_CALL:
            raise ProtocolError(f"{count} keys in one request exceeds {MAX_KEYS_PER_CALL}")
        lengths = struct.unpack(f"<{count}H", _recv_exact(sock, 2 * count)) if count else ()
        total = sum(lengths)
        if total > MAX_KEY_BLOB:  # a bad key is answered below; a huge one breaks the framing
            raise ProtocolError(f"{total} key bytes in one request exceeds {MAX_KEY_BLOB}")
        blob = bytes(_recv_exact(sock, total))
        keys, at = [], 0
        for n in lengths:
            keys.append(blob[at : at + n])
            at += n
        start = time.perf_counter()
        try:
            check_keys(keys)
        except InvalidArgument as exc:  # the framing held: answer and keep the connection
            self.metrics.requests.labels("DataGet", exc.code.name).inc()
            sock.sendall(_error_frame(exc.code, str(exc)))
            return True
        resolved = self.market.resolve(keys, prefix) if self.market else [(k, prefix, None) for k in keys]
        try:
            total = 0 if self.storage.damaged else (self.market.sizes(resolved) if self.market
                                                    else self.storage.sizes(keys, prefix))
        except Corrupt:
            total = 0  # each key is answered CORRUPT below
        if total > self.max_get_bytes:  # one small request must not ask for 275 GB
            self.metrics.requests.labels("DataGet", "RESOURCE_EXHAUSTED").inc()
            sock.sendall(_error_frame(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                      f"a get of {len(keys)} keys would send {total} bytes, over the "
                                      f"{self.max_get_bytes} a call may: ask for fewer keys at once"))
            return True
        sock.settimeout(SEND_SECONDS)
        self._answer(sock, resolved, prefix)
        self.metrics.requests.labels("DataGet", "OK").inc()
        self.metrics.latency.labels("DataGet").observe(time.perf_counter() - start)
        return True

    def _answer(self, sock: socket.socket, resolved: list, prefix: bytes) -> None:
        sender = _Sender(sock)
        sender.pending += HEADER.pack(MAGIC, OK, 0, VERSION, len(resolved))
        meter = self.market.meter(prefix) if self.market else None

        def send(payload: memoryview, digest: bytes) -> int:
            self.metrics.hits.inc()  # counted before the bytes leave, as over gRPC
            self.metrics.bytes_out.inc(len(payload))
            sender.pending += ENTRY.pack(FOUND, len(payload), digest)
            sender.send(payload)  # from LMDB's map, inside its read transaction
            return len(payload)

        for found in resolved:
            if found is None:  # a listing key this tenant may not read: a plain miss
                self.metrics.misses.labels("missing").inc()
                sender.pending += ENTRY.pack(MISSING, 0, _NO_DIGEST)
                continue
            key, space, listing = found
            try:
                size = self.storage.read_with(key, send, space, verify=False)
            except Corrupt:
                log.warning("corrupt record %s", key.hex())
                self.metrics.misses.labels("corrupt").inc()
                sender.pending += ENTRY.pack(CORRUPT, 0, _NO_DIGEST)
                continue
            if size is None:
                self.metrics.misses.labels("missing").inc()
                sender.pending += ENTRY.pack(MISSING, 0, _NO_DIGEST)
            elif meter is not None:
                self.market.served(meter, listing, size)
        sender.flush()
        if meter is not None:
            self.market.commit(meter)


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _answer_quietly(sock: socket.socket, code: grpc.StatusCode, message: str) -> None:
    try:
        sock.settimeout(1.0)
        sock.sendall(_error_frame(code, message))
    except (OSError, ValueError):
        pass


def _answer_and_close(sock: socket.socket, code: grpc.StatusCode, message: str) -> None:
    _answer_quietly(sock, code, message)
    sock.close()


def server_ssl_context(cert: str, key: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context
