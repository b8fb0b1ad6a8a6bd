"""The data-plane wire format: record bytes for reads over a plain TCP socket, next to gRPC.

Served by ``kvstore.dataplane``, read by ``kvclient.dataplane``; both take these constants.

Python gRPC tops out near 0.5 GB/s on 1 MiB messages; a socket that sends LMDB's memory map
with ``sendmsg`` (no Python-side copy) runs near memory speed. gRPC keeps lookup, put, auth and
placement; the node advertises this port in ``StatResponse.data_port``.

Protocol version 1, little-endian. Every frame starts with a 12-byte header
    magic b"KVDP" | op u8 | flags u8 (0) | version u16 (1) | n u32
Client to node:
    HELLO (op 1), the first frame: n = token length, then the bearer token (UTF-8, empty
        without auth). Answered OK (n = 0) or ERROR UNAUTHENTICATED (then the node closes).
    GET (op 2): n = key count (at most MAX_KEYS_PER_CALL), then n u16 key lengths, then the keys
        back to back. Answered OK (n = key count) followed by one entry per key, in order:
            state u8 (0 FOUND, 1 MISSING, 2 CORRUPT) | payload length u64 | digest 16 bytes
        (XXH3-128 of key ‖ payload, as stored; zeros unless FOUND), then the payload bytes.
        A bad key (empty, over MAX_KEY_BYTES) is answered ERROR INVALID_ARGUMENT and the
        connection stays usable: the whole request was read.
Node to client:
    OK (op 0x80): n as above.
    ERROR (op 0x81): n = message length, then the gRPC status code u32, then the UTF-8 message.
Malformed input (bad magic, op or version, over MAX_KEYS_PER_CALL keys or MAX_KEY_BLOB key bytes,
a truncated frame) is answered ERROR INVALID_ARGUMENT when the socket still takes it, logged, and the
connection closed. Each connection is served by its own thread; beyond `max_connections` the
node answers ERROR RESOURCE_EXHAUSTED and closes. Keys get the tenant's prefix of the HELLO
token, exactly as over gRPC; records are served with verify=False (the reader checks the digest).
"""

from __future__ import annotations

import socket
import struct

from .limits import MiB

MAGIC = b"KVDP"
VERSION = 1
HEADER = struct.Struct("<4sBBHI")  # magic, op, flags, version, n
ENTRY = struct.Struct("<BQ16s")  # state, payload length, digest
CODE = struct.Struct("<I")  # the gRPC status code of an ERROR frame
HELLO, GET, OK, ERROR = 1, 2, 0x80, 0x81
FOUND, MISSING, CORRUPT = 0, 1, 2
SOCKET_BUFFER = 1 * MiB  # measured (bench/dataplane_probe.py): best for streamed 1 MiB records, 4-16 MiB no better


def tune(sock: socket.socket) -> None:
    """Options both ends set (measured: see bench/dataplane_probe.py)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
