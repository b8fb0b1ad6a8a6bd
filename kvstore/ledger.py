"""The ledger behind eviction and quotas: groups, their last access and size, bytes per tenant.

A *group* is what eviction removes as a whole. Block records are keyed ``h_i ‖ uint16 layer``
(34 bytes), so all layers of a block share ``key[:-2]`` and form one group; a key of any other
length is a group of its own. Two named LMDB databases hold the ledger, written in the same
write transaction as the records they describe, so a crash never leaves them out of step:

- ``lru``:   group id -> (last access ns, bytes) as two little-endian uint64
- ``usage``: b"t" ‖ tenant prefix -> bytes as one little-endian uint64

A group id is ``len(tenant) ‖ tenant ‖ kind ‖ body`` (kind ``B``: body = the block's 32-byte
prefix; kind ``K``: body = the whole key), so ids of different tenants and kinds never collide and
one tenant's groups are a contiguous range. Bytes are charged as stored key + value (header and
payload) — what a tenant's quota counts.
"""

from __future__ import annotations

import struct
from collections import defaultdict
from dataclasses import dataclass, field

import lmdb

BLOCK_KEY_BYTES = 34
LAYER_BYTES = 2
ENTRY = struct.Struct("<QQ")
COUNT = struct.Struct("<Q")
LRU_DB = b"lru"
USAGE_DB = b"usage"
_NODE_MAX = 2038  # LMDB (4 KiB pages): a node above this moves its value to overflow pages
_PAGE_HEADER = 16


def group_id(tenant: bytes, key: bytes) -> bytes:
    """The eviction group of a record, from its tenant prefix and its key (without the prefix)."""
    if len(key) == BLOCK_KEY_BYTES:
        return bytes([len(tenant)]) + tenant + b"B" + key[:-LAYER_BYTES]
    return bytes([len(tenant)]) + tenant + b"K" + key


def tenant_range(tenant: bytes) -> bytes:
    """The prefix shared by the group ids of one tenant."""
    return bytes([len(tenant)]) + tenant


def split_group(gid: bytes) -> tuple[bytes, bytes, bytes]:
    """(tenant prefix, kind, body) of a group id."""
    n = gid[0]
    return gid[1 : 1 + n], gid[1 + n : 2 + n], gid[2 + n :]


def usage_key(tenant: bytes) -> bytes:
    return b"t" + tenant


def page_bytes(key_len: int, value_len: int, psize: int = 4096) -> int:
    """About how many bytes of LMDB pages a record occupies (for sizing, not accounting)."""
    if 8 + key_len + value_len > _NODE_MAX:
        return -(-(_PAGE_HEADER + value_len) // psize) * psize
    return 2 * (8 + key_len + value_len)  # leaf pages run about half full after splits


@dataclass
class Changes:
    """What one write transaction does to the ledger, applied once at its end."""

    groups: dict[bytes, int] = field(default_factory=lambda: defaultdict(int))
    tenants: dict[bytes, int] = field(default_factory=lambda: defaultdict(int))
    accessed: set[bytes] = field(default_factory=set)

    def add(self, tenant: bytes, key: bytes, delta: int, access: bool = True) -> None:
        gid = group_id(tenant, key)
        self.groups[gid] += delta
        self.tenants[tenant] += delta
        if access:
            self.accessed.add(gid)

    def touch(self, tenant: bytes, key: bytes) -> None:
        self.accessed.add(group_id(tenant, key))


class Ledger:
    """Reads and writes the ledger databases inside the caller's transactions."""

    def __init__(self, env: lmdb.Environment, data_db, create: bool = True) -> None:
        self.data = data_db
        self.lru = env.open_db(LRU_DB, create=create)
        self.usage_db = env.open_db(USAGE_DB, create=create)

    def apply(self, txn: lmdb.Transaction, changes: Changes, now: int) -> None:
        for gid in set(changes.groups) | changes.accessed:
            old = txn.get(gid, db=self.lru)
            last, size = ENTRY.unpack(old) if old is not None else (0, 0)
            size += changes.groups.get(gid, 0)
            if size <= 0:
                txn.delete(gid, db=self.lru)
            else:
                txn.put(gid, ENTRY.pack(now if gid in changes.accessed else last, size), db=self.lru)
        for tenant, delta in changes.tenants.items():
            if delta:
                total = self.usage(txn, tenant) + delta
                if total > 0:
                    txn.put(usage_key(tenant), COUNT.pack(total), db=self.usage_db)
                else:
                    txn.delete(usage_key(tenant), db=self.usage_db)

    def touch(self, txn: lmdb.Transaction, accessed: dict[bytes, int]) -> None:
        """Record read-side accesses (group id -> ns) of groups that still exist."""
        for gid, when in accessed.items():
            old = txn.get(gid, db=self.lru)
            if old is not None:
                last, size = ENTRY.unpack(old)
                if when > last:
                    txn.put(gid, ENTRY.pack(when, size), db=self.lru)

    def usage(self, txn: lmdb.Transaction, tenant: bytes) -> int:
        raw = txn.get(usage_key(tenant), db=self.usage_db)
        return COUNT.unpack(raw)[0] if raw is not None else 0

    def oldest(self, txn: lmdb.Transaction, tenant: bytes | None, exclude: set[bytes]) -> list[tuple[int, bytes, int]]:
        """(last access, group id, bytes) of every group (of one tenant if given), oldest first."""
        start = tenant_range(tenant) if tenant is not None else b""
        cursor = txn.cursor(db=self.lru)
        found: list[tuple[int, bytes, int]] = []
        if cursor.set_range(start) if start else cursor.first():
            for raw_gid, raw in cursor:
                gid = bytes(raw_gid)
                if start and not gid.startswith(start):
                    break
                if gid not in exclude:
                    last, size = ENTRY.unpack(raw)
                    found.append((last, gid, size))
        found.sort()
        return found

    def members(self, txn: lmdb.Transaction, gid: bytes) -> list[bytes]:
        """The stored keys (with tenant prefix) of a group."""
        tenant, kind, body = split_group(gid)
        if kind == b"K":
            return [tenant + body] if txn.get(tenant + body, db=self.data) is not None else []
        start, full = tenant + body, len(tenant) + BLOCK_KEY_BYTES
        cursor = txn.cursor(db=self.data)
        keys: list[bytes] = []
        if cursor.set_range(start):
            for key in cursor.iternext(keys=True, values=False):
                if not bytes(key).startswith(start):
                    break
                if len(key) == full:
                    keys.append(bytes(key))
        return keys

    def evict(self, txn: lmdb.Transaction, gids: list[bytes]) -> tuple[int, int]:
        """Delete whole groups with their ledger entries. Returns (records, bytes) removed."""
        records = freed = 0
        changes = Changes()
        for gid in gids:
            tenant = split_group(gid)[0]
            for key in self.members(txn, gid):
                value = txn.get(key, db=self.data)
                size = len(key) + len(value)
                txn.delete(key, db=self.data)
                changes.add(tenant, key[len(tenant) :], -size, access=False)
                records += 1
                freed += size
            txn.delete(gid, db=self.lru)  # even if its bytes drifted: the group is gone
            changes.groups.pop(gid, None)
        self.apply(txn, changes, 0)
        return records, freed

    def rebuild(self, txn: lmdb.Transaction, now: int) -> int:
        """Derive the ledger from the records (stores written before it existed: no tenants)."""
        txn.drop(self.lru, delete=False)
        txn.drop(self.usage_db, delete=False)
        changes = Changes()
        count = 0
        for key, value in txn.cursor(db=self.data):
            changes.add(b"", bytes(key), len(key) + len(value))
            count += 1
        self.apply(txn, changes, now)
        return count
