"""Network namespaces that stand for placements: one server namespace joined to one client
namespace by a veth pair per link, each pair shaped with tc tbf (or left unshaped).

Every name carries the prefix `kvb-<pid>` and every namespace is deleted on exit (context
manager, atexit and SIGTERM), so a crashed run leaves nothing behind. Addresses are private
(10.213.<link>.0/30) and exist only inside these namespaces; the root namespace is untouched.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

SUBNET = "10.213"


@dataclass(frozen=True)
class LinkSpec:
    name: str
    rate_bps: int | None  # None: an unshaped veth


def netns_unavailable_reason() -> str | None:
    """Why namespaces cannot be used here, or None when they can."""
    if os.geteuid() != 0:
        return "not root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"no `{tool}` command"
    probe = f"kvb-{os.getpid()}-probe"
    try:
        subprocess.run(["ip", "netns", "add", probe], check=True, capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"`ip netns add` failed: {getattr(exc, 'stderr', b'') or exc}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=10)
    return None


def skip_reason(loopback_only: bool) -> str | None:
    """Why a scenario runs on loopback instead of namespaces, or None."""
    return "--loopback-only" if loopback_only else netns_unavailable_reason()


def tbf_args(rate_bps: int) -> list[str]:
    """tbf with a bucket of >= 5 ms of traffic (and >= 4 GSO-sized packets) and 50 ms of queue:
    a smaller bucket undershoots the rate with TSO/GSO super-packets on veth."""
    burst = max(rate_bps // 8 // 200, 256 * 1024)
    return ["tbf", "rate", f"{rate_bps}bit", "burst", str(burst), "latency", "50ms"]


class NetnsLab:
    """Server namespace `<prefix>-s` and client namespace `<prefix>-c`, one veth pair per link."""

    def __init__(self, links: Sequence[LinkSpec], prefix: str | None = None) -> None:
        self.links = list(links)
        self.prefix = prefix or f"kvb-{os.getpid()}"
        self.server_ns = f"{self.prefix}-s"
        self.client_ns = f"{self.prefix}-c"
        self._created: list[str] = []
        self._old_sigterm = None

    # ---- addressing ---------------------------------------------------------------------
    def server_ip(self, link: LinkSpec) -> str:
        return f"{SUBNET}.{self.links.index(link) + 1}.2"

    def client_ip(self, link: LinkSpec) -> str:
        return f"{SUBNET}.{self.links.index(link) + 1}.1"

    def exec_argv(self, ns: str, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", ns, *argv]

    # ---- lifecycle ----------------------------------------------------------------------
    def _ip(self, *args: str, ns: str | None = None) -> None:
        argv = ["ip", *args] if ns is None else self.exec_argv(ns, ["ip", *args])
        subprocess.run(argv, check=True, capture_output=True, timeout=15)

    def _tc(self, ns: str, *args: str) -> None:
        subprocess.run(self.exec_argv(ns, ["tc", *args]), check=True, capture_output=True, timeout=15)

    def __enter__(self) -> "NetnsLab":
        atexit.register(self.close)
        if hasattr(signal, "SIGTERM"):
            self._old_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            for ns in (self.server_ns, self.client_ns):
                self._ip("netns", "add", ns)
                self._created.append(ns)
                self._ip("link", "set", "lo", "up", ns=ns)
            tag = str(os.getpid())[-7:]
            for i, link in enumerate(self.links, start=1):
                s_if, c_if = f"kb{tag}s{i}", f"kb{tag}c{i}"
                self._ip("link", "add", s_if, "netns", self.server_ns, "type", "veth",
                         "peer", "name", c_if, "netns", self.client_ns)
                for ns, dev, ip in ((self.server_ns, s_if, self.server_ip(link)),
                                    (self.client_ns, c_if, self.client_ip(link))):
                    self._ip("addr", "add", f"{ip}/30", "dev", dev, ns=ns)
                    self._ip("link", "set", dev, "up", ns=ns)
                if link.rate_bps:
                    # shape server -> client: the direction of a fetch (and of billed egress)
                    self._tc(self.server_ns, "qdisc", "add", "dev", s_if, "root", *tbf_args(link.rate_bps))
        except BaseException:
            self.close()
            raise
        return self

    def _on_sigterm(self, signum, frame) -> None:
        self.close()
        raise SystemExit(128 + signum)

    def close(self) -> None:
        while self._created:
            ns = self._created.pop()
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=15)
        if self._old_sigterm is not None:
            signal.signal(signal.SIGTERM, self._old_sigterm)
            self._old_sigterm = None
        atexit.unregister(self.close)

    def __exit__(self, *exc) -> None:
        self.close()
