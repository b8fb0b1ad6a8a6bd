"""Hand-framing of protobuf `bytes` fields, so large payloads are copied once into a message.

Protobuf fields may appear in any order: a message is its small fields serialized normally,
followed by the big `bytes` field framed here (tag, varint length, the bytes).
"""

from __future__ import annotations

from collections.abc import Iterator

from .limits import CHUNK_BYTES, PUT_DATA_FIELD
from .pb import kvcache_pb2 as pb


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def with_bytes_field(head: bytes, field_number: int, data: bytes | memoryview) -> bytes:
    """`head` (a serialized message) plus a length-delimited field: one copy of `data`."""
    if not len(data):
        return head
    return b"".join((head, bytes([(field_number << 3) | 2]), varint(len(data)), data))


def put_messages(key: bytes, value: bytes | memoryview, digest: bytes) -> Iterator[bytes]:
    """Serialized PutRequest messages of one record (its head, then CHUNK_BYTES pieces), each
    payload chunk copied once: what a client and a node's agents stream to a node's Put."""
    view = memoryview(value).cast("B")
    head = pb.PutRequest(key=key, size=len(view), checksum=digest).SerializeToString()
    yield with_bytes_field(head, PUT_DATA_FIELD, view[:CHUNK_BYTES])
    for start in range(CHUNK_BYTES, len(view), CHUNK_BYTES):
        yield with_bytes_field(b"", PUT_DATA_FIELD, view[start : start + CHUNK_BYTES])
