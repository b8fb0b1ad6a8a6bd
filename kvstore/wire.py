"""Hand-framed Get replies: each message built with one copy straight from the LMDB view.

Building a GetResponse with protobuf costs three copies of the payload per chunk (slice to
bytes, into the message, out by SerializeToString). Protobuf fields may come in any order, so a
reply is its small fields serialized normally followed by field 5 (`data`) framed by hand.
"""

from __future__ import annotations

from kvproto.framing import with_bytes_field
from kvproto.pb import kvcache_pb2 as pb

from kvproto.limits import GET_DATA_FIELD as DATA_FIELD


def found_frames(index: int, payload: memoryview, digest: bytes, chunk: int) -> list[bytes]:
    """The serialized replies of one found record, copied out of `payload` (valid only now)."""
    size = len(payload)
    frames = []
    starts = range(0, size, chunk) if size else [0]
    last_start = starts[-1]
    for start in starts:
        first = start == 0
        head = pb.GetResponse(
            index=index,
            state=pb.RECORD_STATE_FOUND,
            size=size if first else 0,
            checksum=digest if first else b"",
            last=start == last_start,
        ).SerializeToString()
        frames.append(with_bytes_field(head, DATA_FIELD, payload[start : start + chunk]))
    return frames


def state_frame(index: int, state: int) -> bytes:
    return pb.GetResponse(index=index, state=state, last=True).SerializeToString()
