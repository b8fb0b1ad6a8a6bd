"""A Put stream's records into a spool, checked as they arrive.

Each record is a header (key, size, checksum) with its first chunk, then chunks until `size`
bytes came; the spool checks the checksum at the record's end. A peer's stream names stored keys
(``kvstore.callers.split_peer_key``): one tenant's records, spooled under the client's keys.
"""

from __future__ import annotations

from collections.abc import Iterable

from kvproto import record
from kvproto.errors import Corrupt, InvalidArgument, QuotaExceeded
from kvproto.pb import kvcache_pb2 as pb

from .callers import check_key, split_peer_key
from .config import ServerConfig
from .spool import Spool


def receive(messages: Iterable[pb.PutRequest], watch, spool: Spool, config: ServerConfig, market=None,
            peer: bool = False) -> tuple[int, bytes | None]:
    """Bytes received, and (for a peer) the tenant prefix of the stream's records."""
    current: pb.PutRequest | None = None
    got = total = 0
    space = None
    for msg in messages:
        watch.beat()
        if current is None:
            if peer:
                space = split_peer_key(msg, space)
            current, got = _start_record(msg, total, config, market), 0
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


def _start_record(msg: pb.PutRequest, total: int, config: ServerConfig, market) -> pb.PutRequest:
    check_key(msg.key)
    if market is not None:
        market.check_writable(msg.key)
    if len(msg.checksum) != record.DIGEST_SIZE:
        raise InvalidArgument("checksum must be 16 bytes (XXH3-128 of key and payload)")
    if msg.size > config.max_record_bytes:
        raise QuotaExceeded(f"record of {msg.size} bytes exceeds limit {config.max_record_bytes}")
    if total + msg.size > config.max_stream_bytes:
        raise QuotaExceeded(f"put stream exceeds {config.max_stream_bytes} bytes")
    return pb.PutRequest(key=msg.key, size=msg.size, checksum=msg.checksum)
