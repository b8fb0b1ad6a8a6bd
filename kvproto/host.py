"""Host identity: how a node and a client tell they share a kernel (the co-located path)."""

from __future__ import annotations

import os
import socket

HOST_ID_ENV = "KVCACHE_HOST_ID"  # set by `kvstore serve --host-id` / `kvctl --host-id`, or by hand


def host_id() -> str:
    """Same host ⇔ same hostname and same kernel boot; or the host identity the process was given
    ($KVCACHE_HOST_ID: hosts that share a kernel, e.g. network namespaces standing for machines)."""
    given = os.environ.get(HOST_ID_ENV)
    if given:
        return given
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "no-boot-id"
    return f"{socket.gethostname()}/{boot}"
