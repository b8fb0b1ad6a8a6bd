"""A raw TCP byte server and client: the fair baseline for gRPC (same Python, same sizes).

Protocol, one request at a time per connection: 9 bytes `op (b"P" or b"G") | uint64 LE size`.
"P": the client sends `size` bytes, the server reads them with a recv_into loop and answers b"K".
"G": the server sends `size` bytes; the client reads them into a fresh buffer per record (as a
gRPC client allocates one bytes object per record).

Run as a process: `python -m bench.sockserve --listen HOST:PORT`; it prints `PORT <n>` when ready
and serves until killed or until its stdin closes.
"""

from __future__ import annotations

import argparse
import os
import socket
import struct
import sys
import threading
import time
from collections.abc import Sequence

HEADER = struct.Struct("<cQ")
CHUNK = 1 << 20


def _recv_exact_into(sock: socket.socket, view: memoryview) -> None:
    got, n = 0, len(view)
    while got < n:
        k = sock.recv_into(view[got:], min(n - got, 4 * CHUNK))
        if k == 0:
            raise ConnectionError("peer closed mid-record")
        got += k


def _send_zeros(sock: socket.socket, n: int, source: memoryview) -> None:
    while n > 0:
        k = min(n, len(source))
        sock.sendall(source[:k])
        n -= k


def _serve_connection(conn: socket.socket, scratch: bytearray) -> None:
    head = bytearray(HEADER.size)
    view = memoryview(scratch)
    with conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while True:
            try:
                _recv_exact_into(conn, memoryview(head))
            except ConnectionError:
                return
            op, size = HEADER.unpack(head)
            if op == b"P":
                left = size
                while left > 0:
                    k = min(left, len(view))
                    _recv_exact_into(conn, view[:k])
                    left -= k
                conn.sendall(b"K")
            elif op == b"G":
                _send_zeros(conn, size, view)
            else:
                return


def serve(listen: str) -> None:
    host, port = listen.rsplit(":", 1)
    srv = socket.create_server((host, int(port)), backlog=16)
    print(f"PORT {srv.getsockname()[1]}", flush=True)
    threading.Thread(target=lambda: (sys.stdin.read(), os._exit(0)), daemon=True).start()
    while True:
        try:
            conn, _ = srv.accept()
        except OSError:
            return
        threading.Thread(target=_serve_connection, args=(conn, bytearray(16 * CHUNK)), daemon=True).start()


def connect(addr: str, timeout: float = 30.0, deadline_s: float = 15.0) -> socket.socket:
    """Connect, retrying until the server is up (readiness by connecting, not by sleeping long)."""
    host, port = addr.rsplit(":", 1)
    end = time.monotonic() + deadline_s
    while True:
        try:
            sock = socket.create_connection((host, int(port)), timeout=timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(0.05)


def put_records(sock: socket.socket, payloads: Sequence[bytes]) -> float:
    """Send each payload as one record; returns seconds until the last acknowledgement."""
    ack = bytearray(1)
    t0 = time.perf_counter()
    for p in payloads:
        sock.sendall(HEADER.pack(b"P", len(p)))
        sock.sendall(p)
        _recv_exact_into(sock, memoryview(ack))
    return time.perf_counter() - t0


def get_records(sock: socket.socket, sizes: Sequence[int]) -> float:
    """Read one record per size into a fresh buffer; returns seconds for all of them."""
    t0 = time.perf_counter()
    for n in sizes:
        sock.sendall(HEADER.pack(b"G", n))
        buf = bytearray(n)
        _recv_exact_into(sock, memoryview(buf))
    return time.perf_counter() - t0


def get_records_into(sock: socket.socket, views: Sequence[memoryview]) -> None:
    """Read one record into each caller-owned view (no allocation)."""
    for view in views:
        sock.sendall(HEADER.pack(b"G", len(view)))
        _recv_exact_into(sock, view)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--listen", default="127.0.0.1:0")
    serve(ap.parse_args(argv).listen)


if __name__ == "__main__":
    main()
