"""Hand-framing of protobuf `bytes` fields, so large payloads are copied once into a message.

Protobuf fields may appear in any order: a message is its small fields serialized normally,
followed by the big `bytes` field framed here (tag, varint length, the bytes).
"""

from __future__ import annotations


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
