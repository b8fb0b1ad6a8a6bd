"""Host identity: how a node and a client tell they share a kernel (the co-located path)."""

from __future__ import annotations

import socket


def host_id() -> str:
    """Same host ⇔ same hostname and same kernel boot."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "no-boot-id"
    return f"{socket.gethostname()}/{boot}"
