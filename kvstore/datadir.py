"""A node's data directory: private by default, and held by one live node at a time.

The directory is 0700 and its files 0600: whoever reads ``data.mdb`` reads every tenant's
records. ``--colocated on`` opens them to the group (0750 / 0640), for co-located clients that
run as another user of the node's group. A lock file (``kvstore.lock``, holding the pid and the
address of its holder) is locked with ``flock`` for the node's life: a second node on the same
directory is refused with the holder named, and a crashed holder's lock goes with its process.
"""

from __future__ import annotations

import fcntl
import os

LOCK_FILE = "kvstore.lock"
FILES = ("data.mdb", "lock.mdb")


class DataDirError(ValueError):
    """The data directory cannot be used (one line that names it and what to do)."""


def modes(shared: bool) -> tuple[int, int]:
    """(directory mode, file mode)."""
    return (0o750, 0o640) if shared else (0o700, 0o600)


def prepare(path: str, shared: bool = False) -> int:
    """Create `path` if needed and set its modes and those of its files; the file mode."""
    if not path:
        raise DataDirError("--data is empty: name the node's data directory")
    dir_mode, file_mode = modes(shared)
    try:
        os.makedirs(path, mode=dir_mode, exist_ok=True)
        os.chmod(path, dir_mode)
        for name in (*FILES, LOCK_FILE):
            target = os.path.join(path, name)
            if os.path.exists(target):
                os.chmod(target, file_mode)
    except OSError as exc:
        raise DataDirError(f"data directory {path}: {exc.strerror}") from exc
    if not os.path.isdir(path):
        raise DataDirError(f"data directory {path} is not a directory")
    return file_mode


class DirLock:
    """The flock on ``DIR/kvstore.lock``; released by ``release`` or by the holder's exit."""

    def __init__(self, path: str, holder: str = "", file_mode: int = 0o600) -> None:
        self.path = os.path.join(path, LOCK_FILE)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, file_mode)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                who = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
            finally:
                os.close(fd)
            raise DataDirError(f"data directory {path} is in use by {who}; stop that node or choose another --data")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"node pid {os.getpid()}{' at ' + holder if holder else ''}\n".encode(), 0)
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
