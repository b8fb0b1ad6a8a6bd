"""The co-located fast path: read a same-host node's LMDB directly through a read-only map.

Only reads take this path; writes always go through gRPC. The node tells the client where its
environment lives (LocalInfo); the client checks that it runs on the same host (hostname + boot
id), that it is another process (LMDB forbids opening one environment twice in a process), that
the files are readable, and that the environment's token matches the node's. Payloads are handed
out as memoryviews of the map, valid only inside ``views()``: copy them (once, into the
destination tensor) before the block ends. Any doubt means falling back to gRPC.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import lmdb

from kvproto import record
from kvproto.errors import Corrupt
from kvproto.host import host_id
from kvproto.integrity import file_check

log = logging.getLogger(__name__)

DATA_DB, META_DB, ENV_TOKEN = record.DATA_DB, record.META_DB, record.ENV_TOKEN


def _file_identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(os.path.join(path, "data.mdb"))
    except OSError:
        return None
    return st.st_dev, st.st_ino


class ColocatedReader:
    def __init__(self, node: str, path: str, env: lmdb.Environment, key_prefix: bytes, verify: bool) -> None:
        self.node = node
        self.path = path
        self.env = env
        self.db = env.open_db(DATA_DB, create=False)
        self.key_prefix = key_prefix
        self.verify = verify
        self.identity = _file_identity(path)
        self.corrupt = 0
        self.broken: str | None = None  # an LMDB error seen: this reader is done, reads go to gRPC

    @classmethod
    def attach(cls, conn, timeout: float, verify: bool = True) -> "ColocatedReader | None":
        """A reader for the node behind `conn`, or None (with the reason logged) if unsafe.
        Raises KVCacheError when the node did not answer (a passing fault: ask again later)."""
        info = conn.local_info(timeout)
        reason = None
        if info.host_id != host_id():
            reason = "different host"
        elif info.pid == os.getpid():
            reason = "node runs in this process"
        elif not os.access(os.path.join(info.data_path, "data.mdb"), os.R_OK):
            reason = f"cannot read {info.data_path}"
        else:
            reason = file_check(info.data_path)  # a truncated file would be SIGBUS once mapped
        if reason:
            log.info("co-located path off for %s: %s", conn.address, reason)
            return None
        try:
            env = lmdb.open(info.data_path, readonly=True, lock=True, max_dbs=4, create=False, readahead=False)
        except lmdb.Error as exc:
            log.info("co-located path off for %s: %s", conn.address, exc)
            return None
        try:
            env.set_mapsize(0)  # map the node's whole file, whatever its configured size
            meta = env.open_db(META_DB, create=False)
            with env.begin(db=meta) as txn:
                token = txn.get(ENV_TOKEN)
        except lmdb.Error:
            token = None
        if token != info.env_token:
            env.close()
            log.info("co-located path off for %s: %s holds another node's files", conn.address, info.data_path)
            return None
        return cls(conn.address, info.data_path, env, info.key_prefix, verify)

    def still_valid(self) -> bool:
        """The node's files are still the ones we mapped (not deleted, not replaced, not found
        damaged by this reader)."""
        return self.broken is None and self.identity is not None and _file_identity(self.path) == self.identity

    def _failed(self, exc: lmdb.Error) -> None:
        if self.broken is None:
            self.broken = f"{type(exc).__name__}: {exc}"
            log.warning("co-located reads of %s stopped (%s): reading over gRPC or the next replica",
                        self.path, self.broken)

    def _begin(self) -> lmdb.Transaction:
        try:
            return self.env.begin(db=self.db, buffers=True)
        except lmdb.MapResizedError:
            self.env.set_mapsize(0)  # the node grew its map: adopt the size now in the file
            return self.env.begin(db=self.db, buffers=True)

    def contains(self, keys: Sequence[bytes]) -> list[bool]:
        """Which keys the map holds (all False after an LMDB error: the caller asks the node)."""
        if self.broken is not None:
            return [False] * len(keys)
        try:
            with self._begin() as txn:
                return [txn.get(self.key_prefix + key) is not None for key in keys]
        except lmdb.Error as exc:
            self._failed(exc)
            return [False] * len(keys)

    @contextmanager
    def views(self, keys: Sequence[bytes], verify: bool = True) -> Iterator[list[tuple[memoryview | None, bytes | None]]]:
        """(payload view, digest still to check) per key, valid inside the block; (None, None)
        for a missing or damaged record.

        With verification on (the reader's and the call's) each record is checked here against
        the key it was asked for and its digest comes back as None. `verify=False` checks the
        structure only and hands the digest to the caller, who hashes the bytes where it copies
        them (once, not twice); a reader made with verify=False never hashes.
        """
        verify = self.verify and verify
        if self.broken is not None:
            yield [(None, None)] * len(keys)
            return
        try:
            txn = self._begin()
        except lmdb.Error as exc:
            self._failed(exc)
            yield [(None, None)] * len(keys)
            return
        with txn:
            out: list[tuple[memoryview | None, bytes | None]] = []
            for key in keys:
                try:
                    stored = txn.get(self.key_prefix + key)
                except lmdb.Error as exc:  # a damaged page: this key and the rest go elsewhere
                    self._failed(exc)
                    out += [(None, None)] * (len(keys) - len(out))
                    break
                if stored is None:
                    out.append((None, None))
                    continue
                try:
                    payload, digest = record.unpack(key, stored, verify=verify)
                    out.append((payload, None if verify or not self.verify else digest))
                except Corrupt:
                    self.corrupt += 1
                    log.warning("corrupt record %s in %s", key.hex(), self.path)
                    out.append((None, None))
            yield out

    def close(self) -> None:
        self.env.close()
