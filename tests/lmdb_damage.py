"""Structural damage to an LMDB file, page by page (for the robustness tests).

LMDB's on-disk format (64-bit build, 4 KiB pages): a page starts with pgno u64, pad u16, flags
u16 and lower/upper u16 (an overflow page keeps its page count there as u32); node offsets (u16)
follow the 16-byte header. A node is lo u16, hi u16, flags u16, key size u16, key, data: a leaf's
data size is lo | hi << 16, a branch's child page is lo | hi << 16 | flags << 32, a big value
(F_BIGDATA) keeps the first page of its overflow run in its data, and a named database
(F_SUBDATA) keeps its 48-byte MDB_db record there (root page last).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

PSIZE = 4096
P_BRANCH, P_LEAF, P_OVERFLOW, P_META = 0x01, 0x02, 0x04, 0x08
F_BIGDATA, F_SUBDATA = 0x01, 0x02
PAGE = struct.Struct("<QHHHH")
NODE = struct.Struct("<HHHH")
DB = struct.Struct("<IHHQQQQQ")  # pad, flags, depth, branch, leaf, overflow, entries, root


@dataclass
class Node:
    page: int
    offset: int  # of the node within the file
    flags: int
    key: bytes
    lo: int
    hi: int


def _file(path: str) -> str:
    return os.path.join(path, "data.mdb")


def read_pages(path: str) -> bytes:
    with open(_file(path), "rb") as f:
        return f.read()


def pages(path: str) -> list[tuple[int, int]]:
    """(pgno, flags) of every page, overflow runs skipped past their first page."""
    data = read_pages(path)
    out, pgno = [], 2
    while (pgno + 1) * PSIZE <= len(data):
        _no, _pad, flags, lower, upper = PAGE.unpack_from(data, pgno * PSIZE)
        out.append((pgno, flags))
        if flags & P_OVERFLOW:
            pgno += max(1, lower | upper << 16)
        else:
            pgno += 1
    return out


def nodes(path: str, pgno: int) -> list[Node]:
    data = read_pages(path)
    base = pgno * PSIZE
    _no, _pad, _flags, lower, _upper = PAGE.unpack_from(data, base)
    out = []
    for i in range((lower - 16) // 2):
        (off,) = struct.unpack_from("<H", data, base + 16 + 2 * i)
        lo, hi, flags, ksize = NODE.unpack_from(data, base + off)
        out.append(Node(pgno, base + off, flags, data[base + off + 8 : base + off + 8 + ksize], lo, hi))
    return out


def write(path: str, offset: int, raw: bytes) -> None:
    with open(_file(path), "r+b") as f:
        f.seek(offset)
        f.write(raw)


def last_page(path: str) -> int:
    """The last page in use, from the newer of the two meta pages."""
    data = read_pages(path)
    best = (-1, 0)
    for m in (0, 1):
        at = m * PSIZE + 16 + 4 + 4 + 8 + 8 + 2 * DB.size
        last, txnid = struct.unpack_from("<QQ", data, at)
        best = max(best, (txnid, last))
    return best[1]


def _meta(path: str) -> tuple[int, int]:
    """(last page, main database root) of the newer meta page."""
    data = read_pages(path)
    best = (-1, 0, 0)
    for m in (0, 1):
        at = m * PSIZE + 16 + 4 + 4 + 8 + 8
        main_root = DB.unpack_from(data, at + DB.size)[-1]
        last, txnid = struct.unpack_from("<QQ", data, at + 2 * DB.size)
        best = max(best, (txnid, last, main_root))
    return best[1], best[2]


def live_pages(path: str, db: bytes | None = b"data") -> list[tuple[int, int]]:
    """(pgno, flags) of the branch and leaf pages of one live database (None: the main one)."""
    data = read_pages(path)

    def walk(pgno: int) -> list[tuple[int, int]]:
        flags = PAGE.unpack_from(data, pgno * PSIZE)[2]
        out = [(pgno, flags)]
        if flags & P_BRANCH:
            for n in nodes(path, pgno):
                out += walk(n.lo | n.hi << 16 | n.flags << 32)
        return out

    main = walk(_meta(path)[1])
    if db is None:
        return main
    return walk(_subdb_root(path, db, main))


def _subdb_node(path: str, name: bytes, main: list[tuple[int, int]] | None = None) -> Node:
    for pgno, flags in main if main is not None else live_pages(path, None):
        if flags & P_LEAF:
            for node in nodes(path, pgno):
                if node.flags & F_SUBDATA and node.key == name:
                    return node
    raise LookupError(f"no sub-database {name!r}")


def _subdb_root(path: str, name: bytes, main: list[tuple[int, int]]) -> int:
    node = _subdb_node(path, name, main)
    data = read_pages(path)
    return DB.unpack_from(data, node.offset + 8 + len(node.key))[-1]


def big_nodes(path: str) -> list[Node]:
    return [n for p, f in live_pages(path) if f & P_LEAF for n in nodes(path, p) if n.flags & F_BIGDATA]


# ---- the damages (each names what it does) --------------------------------------------------
def damage_size_field(path: str) -> str:
    """A big record's size field claims 2 GiB: reading it runs past the end of the file."""
    node = big_nodes(path)[0]
    write(path, node.offset, struct.pack("<HH", 0xFFFF, 0x7FFF))
    return "size field"


def damage_truncate(path: str) -> str:
    size = os.path.getsize(_file(path))
    with open(_file(path), "r+b") as f:
        f.truncate(max(4 * PSIZE, size // 2 // PSIZE * PSIZE))
    return "truncated file"


def damage_overflow_pointer(path: str) -> str:
    """A big record points at a branch or leaf page instead of its overflow run."""
    node = big_nodes(path)[0]
    target = next(p for p, f in live_pages(path) if f & (P_BRANCH | P_LEAF) and p != node.page)
    write(path, node.offset + 8 + len(node.key), struct.pack("<Q", target))
    return "overflow pointer"


def damage_overflow_beyond(path: str) -> str:
    """A big record points past the last page."""
    node = big_nodes(path)[0]
    write(path, node.offset + 8 + len(node.key), struct.pack("<Q", last_page(path) + 1000))
    return "overflow pointer past the end"


def damage_branch_child(path: str) -> str:
    """A branch page's child pointer names an overflow page (LMDB asserts on it)."""
    branch = next(p for p, f in live_pages(path) if f & P_BRANCH)
    victim = nodes(path, branch)[1]
    target = next(p for p, f in pages(path) if f & P_OVERFLOW)
    write(path, victim.offset, struct.pack("<HHH", target & 0xFFFF, (target >> 16) & 0xFFFF, target >> 32))
    return "branch page child"


def damage_branch_page(path: str) -> str:
    """A branch page's header is overwritten (it claims to be a leaf with garbage offsets)."""
    branch = next(p for p, f in live_pages(path) if f & P_BRANCH)
    write(path, branch * PSIZE + 10, struct.pack("<HHH", P_LEAF, 4000, 20))
    return "branch page header"


def damage_subdatabase(path: str, name: bytes = b"data") -> str:
    """The main database's record of a named database gets a root page past the end."""
    node = _subdb_node(path, name)
    write(path, node.offset + 8 + len(node.key) + DB.size - 8, struct.pack("<Q", last_page(path) + 5000))
    return "sub-database root"


def damage_subdatabase_depth(path: str, name: bytes = b"data") -> str:
    """The named database's record claims depth 40 and a root that is an overflow page."""
    node = _subdb_node(path, name)
    target = next(p for p, f in pages(path) if f & P_OVERFLOW)
    at = node.offset + 8 + len(node.key)
    write(path, at + 6, struct.pack("<H", 40))
    write(path, at + DB.size - 8, struct.pack("<Q", target))
    return "sub-database depth"


DAMAGES = [damage_size_field, damage_truncate, damage_overflow_pointer, damage_overflow_beyond,
           damage_branch_child, damage_branch_page, damage_subdatabase, damage_subdatabase_depth]
