"""The client side of the node's data plane (the protocol: ``kvproto.dataplane``).

Reads move record bytes over a plain TCP socket: each payload is received with ``recv_into`` a
buffer of its exact size (no joins), then checked against its key-bound digest. Every socket or
protocol failure raises ``Unavailable`` naming the node, so the client's replica fallback works;
a connection that cannot even be opened raises ``CannotConnect`` (the caller falls back to gRPC).

The wire format is ``kvproto.dataplane``, shared with the node.
"""

from __future__ import annotations

import logging
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator, Sequence

import grpc

from kvproto import record
from kvproto.errors import InvalidArgument, KVCacheError, Unavailable, from_status
from kvproto.dataplane import CODE, CORRUPT, ENTRY, ERROR, FOUND, GET, HEADER, HELLO, MAGIC, MISSING, OK, VERSION, tune
from kvproto.limits import MAX_KEY_BYTES, MAX_KEYS_PER_CALL

log = logging.getLogger(__name__)

MAX_ERROR_BYTES = 1 << 16
_CODES = {code.value[0]: code for code in grpc.StatusCode}


class CannotConnect(Unavailable):
    """The data connection could not be opened (refused, TLS, timeout): use gRPC instead."""


class DataConnection:
    """One data-plane connection to one node; one request at a time (the pool sees to it)."""

    def __init__(self, host: str, port: int, token: str | None = None, timeout: float = 10.0,
                 ssl_context: ssl.SSLContext | None = None, node: str = "") -> None:
        self.node = node or f"{host}:{port}"
        self.usable = False
        self.scratch = bytearray()  # the receive buffer of `entries(reuse=True)`
        deadline = time.monotonic() + timeout
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
            tune(sock)
            if ssl_context is not None:
                sock = ssl_context.wrap_socket(sock, server_hostname=host)
        except (OSError, ssl.SSLError) as exc:
            raise CannotConnect(f"{self.node}: UNAVAILABLE: data plane: {exc}") from None
        self.sock = sock
        encoded = (token or "").encode()
        try:
            self._send(HEADER.pack(MAGIC, HELLO, 0, VERSION, len(encoded)) + encoded, deadline)
            self._reply(deadline)
        except Unavailable as exc:
            self.close()
            raise CannotConnect(str(exc)) from None
        except KVCacheError:
            self.close()
            raise
        self.usable = True

    # ---- framing -----------------------------------------------------------------------
    def _fail(self, what: str) -> Unavailable:
        self.usable = False
        return Unavailable(f"{self.node}: UNAVAILABLE: data plane: {what}")

    def _timeout(self, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise self._fail("deadline exceeded")
        self.sock.settimeout(left)

    def _send(self, data: bytes, deadline: float) -> None:
        try:
            self._timeout(deadline)
            self.sock.sendall(data)
        except (OSError, ssl.SSLError) as exc:
            raise self._fail(f"send failed: {exc}") from None

    def _recv_into(self, view: memoryview, deadline: float) -> None:
        got, n = 0, len(view)
        try:
            while got < n:
                self._timeout(deadline)
                k = self.sock.recv_into(view[got:])
                if k == 0:
                    raise self._fail(f"connection closed ({got} of {n} bytes of a frame)")
                got += k
        except (OSError, ssl.SSLError) as exc:
            raise self._fail(f"receive failed: {exc}") from None

    def _recv(self, n: int, deadline: float) -> bytearray:
        buf = bytearray(n)
        self._recv_into(memoryview(buf), deadline)
        return buf

    def _reply(self, deadline: float) -> int:
        """The n of an OK frame; an ERROR frame raises the node's error."""
        magic, op, _flags, version, n = HEADER.unpack(self._recv(HEADER.size, deadline))
        if magic != MAGIC or version != VERSION:
            raise self._fail(f"bad reply (magic {bytes(magic)!r}, version {version})")
        if op == OK:
            return n
        if op != ERROR or n > MAX_ERROR_BYTES:
            raise self._fail(f"bad reply op {op}")
        (value,) = CODE.unpack(self._recv(CODE.size, deadline))
        message = bytes(self._recv(n, deadline)).decode("utf-8", errors="replace")
        code = _CODES.get(value, grpc.StatusCode.UNKNOWN)
        if code != grpc.StatusCode.INVALID_ARGUMENT:  # the node closes after any other error
            self.usable = False
        raise from_status(code, message, self.node)

    # ---- reads -------------------------------------------------------------------------
    def request(self, keys: Sequence[bytes], deadline: float) -> None:
        """Send a GET and read the node's OK (an ERROR raises); then read `entries`."""
        self.usable = False  # until every entry has been read
        lengths = [len(k) for k in keys]
        if len(keys) > MAX_KEYS_PER_CALL or any(n > MAX_KEY_BYTES for n in lengths):
            self.usable = True  # nothing was sent
            raise InvalidArgument(f"{self.node}: INVALID_ARGUMENT: over {MAX_KEYS_PER_CALL} keys "
                                  f"or a key over {MAX_KEY_BYTES} bytes")
        head = HEADER.pack(MAGIC, GET, 0, VERSION, len(keys)) + struct.pack(f"<{len(keys)}H", *lengths)
        self._send(b"".join([head, *keys]), deadline)
        try:
            count = self._reply(deadline)
        except KVCacheError as exc:
            if exc.code == grpc.StatusCode.INVALID_ARGUMENT:
                self.usable = True  # the node read the whole request and waits for the next
            raise
        if count != len(keys):
            raise self._fail(f"reply for {count} keys, asked {len(keys)}")

    def entries(self, keys: Sequence[bytes], deadline: float,
                reuse: bool = False) -> Iterator[tuple[int, bytearray | memoryview | None, bool]]:
        """(index, value or None, corrupt) per key in order; each value its own bytearray, or with
        `reuse` a view of this connection's receive buffer, valid until the next entry (fresh
        memory costs page faults: ~0.85 GB/s here against ~10 GB/s into warm pages)."""
        entry = bytearray(ENTRY.size)
        entry_view = memoryview(entry)
        for i, key in enumerate(keys):
            self._recv_into(entry_view, deadline)
            state, size, digest = ENTRY.unpack(entry)
            if state != FOUND:
                if state not in (MISSING, CORRUPT) or size:
                    raise self._fail(f"bad entry state {state}")
                yield i, None, state == CORRUPT
                continue
            if reuse:
                if len(self.scratch) < size:
                    self.scratch = bytearray(size)
                value = memoryview(self.scratch)[:size]
            else:
                value = bytearray(size)
            self._recv_into(memoryview(value), deadline)
            if record.digest(key, value) != digest:
                yield i, None, True
            else:
                yield i, value, False
        self.usable = True

    def close(self) -> None:
        self.usable = False
        try:
            self.sock.close()
        except OSError:
            pass


class DataPool:
    """A few reusable data connections to one node; thread-safe, one request per connection."""

    def __init__(self, host: str, port: int, token: str | None = None,
                 ssl_context: ssl.SSLContext | None = None, node: str = "", size: int = 4) -> None:
        self.host, self.port, self.token = host, port, token
        self.ssl_context = ssl_context
        self.node = node or f"{host}:{port}"
        self.size = size
        self._idle: list[DataConnection] = []
        self._lock = threading.Lock()

    def _open(self, deadline: float) -> DataConnection:
        return DataConnection(self.host, self.port, self.token, max(0.001, deadline - time.monotonic()),
                              self.ssl_context, self.node)

    def get(self, keys: Sequence[bytes], timeout: float, reuse: bool = False) -> Iterator[tuple[int, bytearray | memoryview | None, bool]]:
        """Send the request now (CannotConnect if no connection opens); return the entries."""
        deadline = time.monotonic() + timeout
        keys = list(keys)
        with self._lock:
            conn = self._idle.pop() if self._idle else None
        if conn is not None:
            try:
                conn.request(keys, deadline)
            except Unavailable:  # the node closed an idle connection (restart, idle timeout)
                conn.close()
                conn = None
            except KVCacheError:
                self._release(conn)
                raise
        if conn is None:
            conn = self._open(deadline)
            try:
                conn.request(keys, deadline)
            except KVCacheError:
                self._release(conn)
                raise
        return self._entries(conn, keys, deadline, reuse)

    def _entries(self, conn: DataConnection, keys: list[bytes], deadline: float, reuse: bool):
        try:
            yield from conn.entries(keys, deadline, reuse)
        finally:
            self._release(conn)  # closed unless every entry was read

    def _release(self, conn: DataConnection) -> None:
        if conn.usable:
            with self._lock:
                if len(self._idle) < self.size:
                    self._idle.append(conn)
                    return
        conn.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def client_ssl_context(tls_ca: bytes) -> ssl.SSLContext:
    """Trust the CA the gRPC channel trusts; check the node's name like gRPC does."""
    return ssl.create_default_context(cadata=tls_ca.decode("ascii"))
