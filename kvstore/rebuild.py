"""`kvstore rebuild`: set a damaged node's files aside so that it can be refilled from the replicas.

A node whose file failed its checks (``kvstore.scrub``) serves nothing from it and says so (log,
``kvstore_needs_rebuild``, ``Stat.needs_rebuild``). With the node stopped, ``set_aside`` moves
``data.mdb`` and ``lock.mdb`` into ``DIR/damaged-<UTC time>/`` (kept for a post-mortem, never
read again); the node then starts empty, and the client's anti-entropy pass (``kvctl repair``,
``Client.repair``) copies every key it owns back from the other replicas.
"""

from __future__ import annotations

import os
import time

from .datadir import FILES, DataDirError, DirLock


def set_aside(path: str) -> str:
    """Move the environment's files out of `path` (refused while a node holds it); the folder."""
    if not path or not os.path.isfile(os.path.join(path, "data.mdb")):
        raise DataDirError(f"{path or '--data'}: no data.mdb (not a node's data directory)")
    lock = DirLock(path, "kvstore rebuild")
    try:
        target = os.path.join(path, time.strftime("damaged-%Y%m%dT%H%M%SZ", time.gmtime()))
        os.makedirs(target, mode=0o700)
        for name in FILES:
            if os.path.exists(os.path.join(path, name)):
                os.replace(os.path.join(path, name), os.path.join(target, name))
    finally:
        lock.release()
    return target
