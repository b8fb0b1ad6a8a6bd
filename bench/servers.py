"""Server subprocesses for benchmarks (a kvstore node or the raw socket server), optionally
inside a network namespace; each is stopped by its own pid on exit, never by name."""

from __future__ import annotations

import atexit
import json
import os
import queue
import re
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from kvstore.process import stop_process

REPO_ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
_PORT_LINE = re.compile(r"(?:PORT |listening on \S*:)(\d+)")


def subprocess_env() -> dict[str, str]:
    """This environment, with the repository first on PYTHONPATH (keeping what was there)."""
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path, GRPC_VERBOSITY="NONE")


def netns_prefix(ns: str | None) -> list[str]:
    return ["ip", "netns", "exec", ns] if ns else []


class ServerProcess:
    """Start argv, wait for the line naming its port, stop it (SIGTERM, then SIGKILL) on exit."""

    def __init__(self, argv: Sequence[str], ready_timeout: float = 30.0) -> None:
        env = subprocess_env()
        self.proc = subprocess.Popen(list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT, env=env)
        atexit.register(self.stop)
        lines: queue.Queue[str | None] = queue.Queue()

        def pump() -> None:
            for line in self.proc.stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        self.port = self._wait_port(lines, ready_timeout)

    def _wait_port(self, lines: queue.Queue, timeout: float) -> int:
        while True:
            try:
                line = lines.get(timeout=timeout)
            except queue.Empty:
                self.stop()
                raise TimeoutError(f"server did not report its port within {timeout:.0f}s") from None
            if line is None:
                err = self.proc.stderr.read()[-2000:] if self.proc.stderr else ""
                self.stop()
                raise RuntimeError(f"server exited before it was ready: {err}")
            match = _PORT_LINE.search(line)
            if match:
                return int(match.group(1))

    def stop(self) -> None:
        stop_process(self.proc)
        atexit.unregister(self.stop)

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def kvstore_node(data_dir: str, listen: str = "127.0.0.1:0", ns: str | None = None,
                 map_size_gb: float = 4.0) -> ServerProcess:
    """A `kvstore serve` node without fsync per commit: benchmarks measure transport, not disk."""
    argv = [PYTHON, "-m", "kvstore.cli", "serve", "--listen", listen, "--data", data_dir,
            "--map-size-gb", str(map_size_gb), "--no-sync", "--log-level", "WARNING"]
    return ServerProcess(netns_prefix(ns) + argv)


def socket_server(listen: str = "127.0.0.1:0", ns: str | None = None) -> ServerProcess:
    return ServerProcess(netns_prefix(ns) + [PYTHON, "-m", "bench.sockserve", "--listen", listen])


def run_worker(ns: str | None, *args: str, timeout: float = 900) -> dict:
    """`python -m bench.fetch ARGS` (in namespace `ns`, if given); its last stdout line as JSON."""
    argv = netns_prefix(ns) + [PYTHON, "-m", "bench.fetch", *args]
    out = subprocess.run(argv, capture_output=True, text=True, cwd=REPO_ROOT, env=subprocess_env(), timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"bench.fetch {args[0]} failed: {out.stderr[-1500:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
