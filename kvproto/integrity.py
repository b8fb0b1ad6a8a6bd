"""Checks that keep a damaged LMDB file from killing the process that maps it.

A damaged file can make LMDB hand out a value that runs past the end of the file (a damaged size
field, or a truncated file): touching it is SIGBUS. And a damaged branch page can trip one of
LMDB's assertions: SIGABRT. Neither can be caught in Python, and a length cannot be bounded
before it is touched: py-lmdb's ``get`` (and every cursor read) pre-faults the whole value, one
byte per page, inside the call. So:

- ``file_check`` compares the file's size with the last page its meta pages name, by reading the
  two meta pages with plain reads, before anything is mapped;
- the node's scrubber (``kvstore.scrub``) walks every database in a child process: what would kill a reader there only
  ends the child, and the node then serves nothing from that file (it needs a rebuild).

The node (``kvstore``) and the co-located reader (``kvclient.colocated``) both run ``file_check``; the reader
maps a node's file only when the node, whose scrub passed, says so (LocalInfo).
"""

from __future__ import annotations

import os
import struct

META_MAGIC = 0xBEEFC0DE
_DB = struct.Struct("<IHHQQQQQ")  # an MDB_db: pad (the page size in FREE_DBI), flags, depth, counts, root
_META = struct.Struct("<IIQQ")  # magic, version, fixed address, map size
_TAIL = struct.Struct("<QQ")  # last page, txn id
_PAGE_HEADER = 16
META_BYTES = 4096  # a meta page is read whole; LMDB pages are at least this big here


def data_file(path: str) -> str:
    return os.path.join(path, "data.mdb")


def _meta(raw: bytes, at: int) -> tuple[int, int, int] | None:
    """(txn id, last page, page size) of the meta page at `at`, None if it is not one."""
    if len(raw) < at + _PAGE_HEADER + _META.size + 2 * _DB.size + _TAIL.size:
        return None
    base = at + _PAGE_HEADER
    magic, _version, _addr, _mapsize = _META.unpack_from(raw, base)
    if magic != META_MAGIC:
        return None
    psize = _DB.unpack_from(raw, base + _META.size)[0]
    last, txnid = _TAIL.unpack_from(raw, base + _META.size + 2 * _DB.size)
    return txnid, last, psize


def file_check(path: str) -> str | None:
    """Why the environment's file cannot be mapped safely, or None when its size holds every
    page its newest meta page names (read with plain reads: nothing is mapped)."""
    name = data_file(path)
    try:
        with open(name, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            raw = f.read(2 * 65536)
    except OSError as exc:
        return f"cannot read {name}: {exc.strerror}"
    first = _meta(raw, 0)
    if first is None:
        return f"{name}: no LMDB meta page at its start"
    psize = first[2]
    if psize < 512 or psize & (psize - 1) or psize > 65536:
        return f"{name}: page size {psize} in its meta page"
    metas = [m for m in (first, _meta(raw, psize)) if m is not None]
    _txnid, last, _ = max(metas)
    if size < (last + 1) * psize:
        return f"{name} is {size} bytes but its meta page names page {last} (needs {(last + 1) * psize}): truncated"
    return None
