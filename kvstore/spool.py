"""Where a Put stream's records wait for their commit: memory for small streams, then a file.

A Put is all-or-nothing: its records commit in one LMDB transaction when the stream ends, so
they must wait somewhere. Up to ``memory_bytes`` they wait in memory; past that, the spool moves
to an unlinked temporary file in the node's data directory (the same disk, so a full disk is
RESOURCE_EXHAUSTED here too), and what a stream holds in memory stays bounded however large it
is. Each record is laid out as it is stored (header, then payload), with its digest computed as
the chunks arrive, so the commit hands LMDB views of the spool, not copies.
"""

from __future__ import annotations

import errno
import mmap
import tempfile
from dataclasses import dataclass

import xxhash

from kvproto import record
from kvproto.errors import QuotaExceeded

from .storage import IncomingRecord

MEMORY_BYTES = 2 << 20  # per stream; the rest goes to the file


@dataclass
class _Entry:
    key: bytes
    digest: bytes
    offset: int  # of its header in the spool
    size: int


class Spool:
    def __init__(self, directory: str, memory_bytes: int | None = None) -> None:
        self.directory = directory
        self.memory_bytes = MEMORY_BYTES if memory_bytes is None else memory_bytes
        self._buf: bytearray | None = bytearray()
        self._file = None
        self.length = 0
        self.entries: list[_Entry] = []
        self._hash: xxhash.xxh3_128 | None = None
        self._map: mmap.mmap | None = None
        self._views: list[memoryview] = []

    def _write(self, data: bytes | memoryview) -> None:
        if self._buf is not None and self.length + len(data) > self.memory_bytes:
            try:
                self._file = tempfile.TemporaryFile(dir=self.directory)
                self._file.write(self._buf)
            except OSError as exc:
                self._fail(exc)
            self._buf = None
        if self._buf is not None:
            self._buf += data
        else:
            try:
                self._file.write(data)
            except OSError as exc:
                self._fail(exc)
        self.length += len(data)

    def _fail(self, exc: OSError):
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise QuotaExceeded(f"disk full under {self.directory}: cannot stage a put") from exc
        raise exc

    def begin(self, key: bytes, size: int, digest: bytes) -> None:
        self.entries.append(_Entry(key, digest, self.length, size))
        self._write(record.pack_header(size, digest))
        self._hash = xxhash.xxh3_128(key)

    def data(self, chunk: bytes) -> None:
        self._hash.update(chunk)
        self._write(chunk)

    def end(self) -> bool:
        """Whether the record just completed matches its digest."""
        ok = self._hash.digest() == self.entries[-1].digest
        self._hash = None
        return ok

    def records(self) -> list[IncomingRecord]:
        """The spooled records, as views valid until ``close``."""
        if self._buf is not None:
            whole = memoryview(self._buf)
        else:
            self._file.flush()
            if not self.length:
                return []
            self._map = mmap.mmap(self._file.fileno(), self.length, prot=mmap.PROT_READ)
            whole = memoryview(self._map)
        self._views.append(whole)
        out = []
        for e in self.entries:
            envelope = whole[e.offset : e.offset + record.HEADER_SIZE + e.size]
            payload = envelope[record.HEADER_SIZE :]
            self._views += [envelope, payload]
            out.append(IncomingRecord(e.key, e.digest, payload, envelope))
        return out

    def close(self) -> None:
        for view in reversed(self._views):
            view.release()
        self._views = []
        if self._map is not None:
            self._map.close()
            self._map = None
        if self._file is not None:
            self._file.close()
            self._file = None
        self._buf = None
