"""`kvstore migrate --data DIR`: convert a node's records from format 1 to format 2 in place.

Format 1 (b"KVR1") carried an XXH3-128 of the payload alone; format 2 binds the digest to the
record's key (``kvproto.record``). Every format-1 record is checked against its old digest
first: one that fails is dropped (and counted), never re-signed. Records live under their
tenant's prefix when the node ran with auth: pass the same --auth-tokens file so each key is
split into prefix and the key its clients use. Run it with the node stopped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import lmdb
import xxhash

from kvproto import record

log = logging.getLogger(__name__)

LEGACY_HEADER = record.HEADER  # format 1 had the same layout; only the magic and the digest differ
BATCH = 256


@dataclass
class MigrationReport:
    converted: int = 0
    already: int = 0
    dropped: int = 0  # failed their format-1 checks


def _legacy_payload(stored: memoryview) -> memoryview | None:
    if len(stored) < LEGACY_HEADER.size:
        return None
    magic, version, flags, size, digest = LEGACY_HEADER.unpack_from(stored)
    payload = stored[LEGACY_HEADER.size :]
    if magic != record.LEGACY_MAGIC or version != 1 or flags or len(payload) != size:
        return None
    return payload if xxhash.xxh3_128_digest(payload) == digest else None


def _split(stored_key: bytes, prefixes: list[bytes]) -> bytes:
    """The client's key: the stored key without its tenant prefix (b"" without auth)."""
    for prefix in prefixes:
        if stored_key.startswith(prefix) and len(stored_key) > len(prefix):
            return stored_key[len(prefix) :]
    return stored_key


def migrate(path: str, tenant_prefixes: list[bytes] | None = None) -> MigrationReport:
    prefixes = sorted(tenant_prefixes or [], key=len, reverse=True)
    report = MigrationReport()
    env = lmdb.open(path, max_dbs=8, create=False, readahead=False, lock=True)
    try:
        data = env.open_db(record.DATA_DB, create=False)
        meta = env.open_db(record.META_DB)
        start: bytes | None = None
        while True:
            changes: list[tuple[bytes, bytes | None]] = []  # (stored key, new value or None: drop)
            with env.begin(db=data, buffers=True) as txn:
                cursor = txn.cursor()
                more = cursor.set_range(start) if start is not None else cursor.first()
                seen = 0
                while more and seen < BATCH:
                    stored_key, stored = bytes(cursor.key()), cursor.value()
                    more = cursor.next()
                    if stored_key == start:
                        continue
                    seen += 1
                    start = stored_key
                    if bytes(stored[:4]) == record.MAGIC:
                        report.already += 1
                        continue
                    payload = _legacy_payload(stored)
                    changes.append((stored_key, None if payload is None else
                                    record.pack(_split(stored_key, prefixes), bytes(payload))))
            with env.begin(db=data, write=True) as txn:
                for stored_key, value in changes:
                    if value is None:
                        log.warning("dropping damaged record %s", stored_key.hex())
                        txn.delete(stored_key)
                        report.dropped += 1
                    else:
                        txn.put(stored_key, value)
                        report.converted += 1
            if seen == 0:
                break
        with env.begin(db=meta, write=True) as txn:
            txn.put(record.FORMAT_KEY, str(record.VERSION).encode())
    finally:
        env.close()
    return report
