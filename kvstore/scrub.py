"""The scrubber: walk a node's LMDB file in a child process, so damage ends the child, not the node.

``python -m kvstore.scrub DIR [--digests]`` opens the environment read-only, checks the file's
size against its meta pages, then walks every named database with a cursor (every branch, leaf
and overflow-page pointer is followed, every value's pages touched), checks each record's
structure and, with ``--digests``, each record's XXH3 over key ‖ payload. It prints one JSON line
and exits 0 when the file is sound, 1 when it found damage. A damaged branch page that trips one
of LMDB's assertions kills the child with SIGABRT, a value past the end of the file with SIGBUS:
``run`` reports both as damage. The node runs it before it opens its file, and again every
``--scrub-hours``; the data database's records are verified under every tenant prefix.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import lmdb

from kvproto import record
from kvproto.errors import Corrupt

from kvproto.integrity import file_check

log = logging.getLogger(__name__)

SCRUB_SECONDS = 600.0  # a walk that takes longer is reported as a failure, not waited on forever


@dataclass(frozen=True)
class ScrubReport:
    ok: bool
    reason: str = ""
    records: int = 0
    bad_records: int = 0
    seconds: float = 0.0


def walk(path: str, digests: bool) -> dict:
    """Walk every database of the environment at `path` (run in the child)."""
    reason = file_check(path)
    if reason:
        return {"ok": False, "reason": reason}
    env = lmdb.open(path, readonly=True, lock=True, max_dbs=16, create=False, readahead=False)
    try:
        env.set_mapsize(0)
        records = bad = 0
        with env.begin(buffers=True) as txn:
            names = [bytes(k) for k in txn.cursor().iternext(keys=True, values=False)]
            current = _current_format(env, txn, names)
            for name in names:
                db = env.open_db(name, txn=txn, create=False)
                for key, value in txn.cursor(db=db).iternext(keys=True, values=True):
                    if name != record.DATA_DB or not current:
                        continue  # records of another format: the node refuses them by name
                    records += 1
                    try:
                        _check_record(bytes(key), value, digests)
                    except Corrupt:
                        bad += 1
        return {"ok": True, "records": records, "bad_records": bad}
    finally:
        env.close()


def _current_format(env: lmdb.Environment, txn: lmdb.Transaction, names: list[bytes]) -> bool:
    """Whether the records are of this node's format (format 1 files had no format key)."""
    if record.META_DB not in names:
        return False
    found = txn.get(record.FORMAT_KEY, db=env.open_db(record.META_DB, txn=txn, create=False))
    return found is not None and bytes(found) == str(record.VERSION).encode()


def _check_record(stored_key: bytes, value: memoryview, digests: bool) -> None:
    """A record's structure (and digest): its key is the stored key less an unknown tenant
    prefix, so the digest is tried against every suffix that the prefix lengths allow."""
    payload, digest = record.unpack(stored_key, value, verify=False)
    if not digests:
        return
    for cut in _prefix_lengths(stored_key):
        if record.digest(stored_key[cut:], payload) == digest:
            return
    raise Corrupt(f"record {stored_key.hex()[:16]} failed its checksum")


def _prefix_lengths(stored_key: bytes) -> list[int]:
    from .auth import PREFIX_BYTES  # tenant prefixes have one fixed length

    return [0, PREFIX_BYTES] if len(stored_key) > PREFIX_BYTES else [0]


def run(path: str, digests: bool = False, timeout: float = SCRUB_SECONDS) -> ScrubReport:
    """Scrub `path` in a child process; damage is a report, never a crash of this process."""
    start = time.monotonic()
    cmd = [sys.executable, "-m", "kvstore.scrub", path] + (["--digests"] if digests else [])
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return ScrubReport(False, f"the scrub of {path} took over {timeout:.0f} s")
    seconds = time.monotonic() - start
    if done.returncode < 0:
        sig = signal.Signals(-done.returncode).name
        tail = done.stderr.strip().splitlines()[-1:] or [""]
        return ScrubReport(False, f"reading {path} kills the reader ({sig}) {tail[0]}".strip(), seconds=seconds)
    try:
        out = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
        return ScrubReport(False, f"scrub of {path} failed: {tail[0]}", seconds=seconds)
    return ScrubReport(bool(out.get("ok")), out.get("reason", ""), out.get("records", 0),
                       out.get("bad_records", 0), seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvstore.scrub", description="walk a node's LMDB file")
    parser.add_argument("path")
    parser.add_argument("--digests", action="store_true", help="verify every record's digest too")
    args = parser.parse_args(argv)
    try:
        out = walk(args.path, args.digests)
    except (lmdb.Error, Corrupt) as exc:
        out = {"ok": False, "reason": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(out), flush=True)
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
