"""The upkeep of a Storage: damage, dead readers, the periodic scrub, and the disk it lives on.

A mixin of ``kvstore.storage.Storage`` (kept apart so the record paths read on their own):

- a file that failed its checks (``kvstore.scrub``) is *damaged*: nothing more is read from or
  written to it (reads answer CORRUPT, the rest DATA_LOSS) until it is rebuilt;
- ``_guard`` maps what LMDB raises: a damaged page to DATA_LOSS (and marks the file), a full map
  or disk to RESOURCE_EXHAUSTED, never INTERNAL;
- a maintenance thread clears reader slots left by dead processes every ``READER_CHECK_SECONDS``
  and runs the full scrub (digests too) every ``scrub_seconds``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

import lmdb

from kvproto.errors import Corrupt, QuotaExceeded
from kvproto.integrity import data_file

from . import scrub

log = logging.getLogger("kvstore.storage")

# what a damaged page raises (BadTxn: what the same transaction answers after one)
DAMAGED = (lmdb.CorruptedError, lmdb.PageNotFoundError, lmdb.BadTxnError, lmdb.PanicError)
READER_CHECK_SECONDS = 2.0
DISK_RESERVE = 1 << 20  # below this much free disk, a failed commit is a full disk


class Upkeep:
    path: str
    env: lmdb.Environment | None
    damaged: str | None
    _map_size: int

    @staticmethod
    def _scrub_reason(report: scrub.ScrubReport) -> str | None:
        if report.ok:
            if report.bad_records:
                log.warning("scrub: %d of %d records fail their checks (each is a miss, repaired on write)",
                            report.bad_records, report.records)
            return None
        return report.reason or "the scrub failed"

    # ---- damage, dead readers, maintenance ----------------------------------------------
    def _usable(self) -> None:
        if self.damaged:
            raise Corrupt(f"storage {self.path} needs a rebuild: {self.damaged}")

    def mark_damaged(self, reason: str) -> None:
        """Serve nothing more from this file (reads answer CORRUPT, writes DATA_LOSS)."""
        if not self.damaged:
            self.damaged = reason
            log.error("%s needs a rebuild, serving nothing more from it: %s "
                      "(`kvstore rebuild --data %s --from NODES` copies it back from the replicas)",
                      self.path, reason, self.path)

    @contextmanager
    def _guard(self) -> Iterator[None]:
        """A damaged page is DATA_LOSS and marks the file for a rebuild; a full disk or map is
        RESOURCE_EXHAUSTED. Neither is INTERNAL."""
        try:
            yield
        except lmdb.MapFullError as exc:
            raise QuotaExceeded(f"store {self.path} is full (LMDB map size reached)") from exc
        except DAMAGED as exc:
            self.mark_damaged(f"{type(exc).__name__}: {exc}")
            raise Corrupt(f"storage damaged: {exc}") from exc
        except lmdb.Error as exc:
            if self.disk_free() < DISK_RESERVE:
                raise QuotaExceeded(f"disk full under {self.path} ({self.disk_free()} bytes free): "
                                    f"{exc}") from exc
            raise

    def reap_readers(self) -> int:
        """Clear the reader slots of dead processes (a co-located client killed inside a read
        transaction would otherwise pin old pages for ever); how many were cleared."""
        if self.env is None:
            return 0
        try:
            cleared = self.env.reader_check()
        except lmdb.Error as exc:
            log.warning("reader check failed: %s", exc)
            return 0
        if cleared:
            log.warning("cleared %d reader slot(s) left by dead processes", cleared)
        return cleared

    def _maintain(self, scrub_seconds: float | None) -> None:
        next_scrub = time.monotonic() + scrub_seconds if scrub_seconds else None
        while not self._stop.wait(READER_CHECK_SECONDS):
            if self.damaged or self.env is None:
                continue
            self.reap_readers()
            if next_scrub is not None and time.monotonic() >= next_scrub:
                report = scrub.run(self.path, digests=True)
                log.info("scrub of %s: %s, %d records (%d bad) in %.1f s", self.path,
                         "sound" if report.ok else report.reason, report.records, report.bad_records,
                         report.seconds)
                if not report.ok:
                    self.mark_damaged(report.reason)
                next_scrub = time.monotonic() + scrub_seconds

    def disk_free(self) -> int:
        try:
            st = os.statvfs(self.path)
        except OSError:
            return 0
        return st.f_bavail * st.f_frsize

    def capacity(self) -> int:
        """Bytes the file may grow to: its map size, or less when the disk holds less."""
        info = self.env.info()
        file_hw = (info["last_pgno"] + 1) * self.env.stat()["psize"]
        try:
            on_disk = max(file_hw, os.path.getsize(data_file(self.path)))  # a failed commit may leave more
        except OSError:
            on_disk = file_hw
        return min(self._map_size, on_disk + max(0, self.disk_free() - DISK_RESERVE))

