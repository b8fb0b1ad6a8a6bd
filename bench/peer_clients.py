"""The peers of `kvbench peers`: one adapter per store with the same small interface
(`put_many`, `get`, `get_many`, `close`), and `PeerLauncher`, which starts each peer's servers on
127.0.0.1 and stops them by their own pid.

A peer that cannot be installed or started raises `PeerUnavailable` (the scenario reports it as
skipped, with the reason); one that answers an operation with an error status raises `PeerError`.

Run as a process, `python -m bench.peer_clients mooncake-holder ...` is the Mooncake Store client
that owns the memory segment the benchmark writes into (so reads cross TCP, as from a remote
node); it prints `PORT <master port>` when mounted and lives until its stdin closes.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from kvstore.process import stop_process

from . import sockserve
from .servers import PYTHON, ServerProcess, kvstore_node, socket_server

PEERS = ("kvstore-remote", "kvstore-grpc", "kvstore-colocated", "redis", "mooncake", "safetensors-dir", "raw-socket")
HOST = "127.0.0.1"
# Mooncake's C++ library takes its log level and setup retries from the environment only
MOONCAKE_ENV = {"MC_LOG_LEVEL": "ERROR", "MC_STORE_CLIENT_SETUP_RETRIES": "3"}


class PeerUnavailable(Exception):
    """The peer cannot be installed or started on this machine."""


class PeerError(Exception):
    """The peer answered an operation with an error status."""


class PeerClient(Protocol):
    def put_many(self, items: Sequence[tuple[bytes, bytes]]) -> None: ...
    def get(self, key: bytes) -> bytes | None: ...
    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class RecordLayout:
    """What one record is: safetensors stores it typed, Mooncake reads it into a sized buffer."""

    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen, what: str, timeout: float = 20.0) -> None:
    """Readiness by connecting (never by sleeping long); fails early if the process died."""
    end = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise PeerUnavailable(f"{what} exited with status {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=1):
            return
        if time.monotonic() > end:
            raise PeerUnavailable(f"{what} did not listen on port {port} within {timeout:.0f}s")
        time.sleep(0.05)


def _spawn(stack: contextlib.ExitStack, argv: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    """A server process whose output goes to a file (a full pipe would stall it), stopped by pid."""
    out = stack.enter_context(open(log, "wb"))
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})})
    stack.callback(stop_process, proc)
    return proc


class SharedClient:
    """One client object used by several benchmark threads; its launcher closes it, not they."""

    def __init__(self, client) -> None:
        self.client = client

    def __getattr__(self, name):
        return getattr(self.client, name)

    def close(self) -> None:
        pass


class RedisPeer:
    """redis-py (hiredis parser): GET per record; a pipeline of GETs/SETs for a batch."""

    def __init__(self, port: int) -> None:
        import redis

        self.r = redis.Redis(host=HOST, port=port, socket_timeout=120)

    def put_many(self, items):
        pipe = self.r.pipeline(transaction=False)
        for key, value in items:
            pipe.set(key, value)
        pipe.execute()

    def get(self, key):
        return self.r.get(key)

    def get_many(self, keys):
        pipe = self.r.pipeline(transaction=False)
        for key in keys:
            pipe.get(key)
        return pipe.execute()

    def close(self):
        self.r.close()


class MooncakePeer:
    """Mooncake Store over TCP: `get` per record; `batch_get_into` a registered buffer per batch
    (its zero-copy batch API), then one copy out to bytes; `put_batch` for writes."""

    def __init__(self, store, layout: RecordLayout, max_batch: int) -> None:
        self.store, self.size = store, layout.nbytes
        self.buf = bytearray(self.size * max_batch)
        self.addr = ctypes.addressof((ctypes.c_char * len(self.buf)).from_buffer(self.buf))
        if store.register_buffer(self.addr, len(self.buf)) != 0:
            raise PeerError("mooncake register_buffer failed")

    def put_many(self, items):
        rc = self.store.put_batch([k.hex() for k, _ in items], [v for _, v in items])
        if rc != 0:
            raise PeerError(f"mooncake put_batch returned {rc}")

    def get(self, key):
        return self.store.get(key.hex()) or None  # Mooncake answers a miss with b""

    def stream_into(self, keys, dest):
        """batch_get_into its registered buffer: that buffer is the destination (no copy)."""
        ptrs = [self.addr + i * self.size for i in range(len(keys))]
        got = self.store.batch_get_into([k.hex() for k in keys], ptrs, [self.size] * len(keys))
        view = memoryview(self.buf)
        return [view[i * self.size:i * self.size + n] if n > 0 else None for i, n in enumerate(got)]

    def get_many(self, keys):
        ptrs = [self.addr + i * self.size for i in range(len(keys))]
        got = self.store.batch_get_into([k.hex() for k in keys], ptrs, [self.size] * len(keys))
        view = memoryview(self.buf)
        return [bytes(view[i * self.size:i * self.size + n]) if n > 0 else None for i, n in enumerate(got)]

    def close(self):
        self.store.unregister_buffer(self.addr)


class SafetensorsDirPeer:
    """vLLM's example-connector layout: a folder per block, one safetensors file per layer record."""

    def __init__(self, root: Path, layout: RecordLayout) -> None:
        from safetensors.numpy import load_file, save_file

        self.root, self.layout, self._load, self._save = root, layout, load_file, save_file

    def _path(self, key: bytes) -> Path:
        return self.root / key[:-2].hex() / f"layer{int.from_bytes(key[-2:], 'little')}.safetensors"

    def put_many(self, items):
        for key, value in items:
            path = self._path(key)
            path.parent.mkdir(exist_ok=True)
            tensor = np.frombuffer(value, self.layout.dtype).reshape(self.layout.shape)
            self._save({"kv_cache": tensor}, str(path))

    def get(self, key):
        path = self._path(key)
        return self._load(str(path))["kv_cache"].tobytes() if path.exists() else None

    def get_many(self, keys):  # no batch API: one file per record
        return [self.get(k) for k in keys]

    def close(self):
        pass


class RawSocketPeer:
    """The transport ceiling (bench/sockserve.py): same sizes, one request per record; its server
    discards writes and sends zeros, so nothing it returns can be checked (`verifies = False`)."""

    verifies = False

    def __init__(self, port: int, layout: RecordLayout) -> None:
        self.sock, self.size = sockserve.connect(f"{HOST}:{port}"), layout.nbytes

    def put_many(self, items):
        sockserve.put_records(self.sock, [v for _, v in items])

    def get(self, key):
        sockserve.get_records(self.sock, [self.size])

    def get_many(self, keys):
        sockserve.get_records(self.sock, [self.size] * len(keys))
        return [None] * len(keys)

    def stream_into(self, keys, dest):
        """recv_into the destination's slots directly: the transport ceiling of a streamed block."""
        views = [dest[i * self.size:(i + 1) * self.size] for i in range(len(keys))]
        sockserve.get_records_into(self.sock, views)
        return [None] * len(keys)

    def close(self):
        self.sock.close()


class PeerLauncher:
    """Starts one peer's servers into `stack` and returns a factory of its clients. The two kvstore
    peers share one node, started once into the launcher's own stack; `capacity` is the bytes one
    peer must hold, `max_batch` the records of one block."""

    def __init__(self, stack: contextlib.ExitStack, workdir: str, layout: RecordLayout, capacity: int,
                 max_batch: int) -> None:
        self.shared, self.workdir, self.layout = stack, Path(workdir), layout
        self.capacity, self.max_batch = capacity, max_batch
        self._node_addr: str | None = None
        self.details: dict[str, dict] = {}  # per peer: facts the report states (e.g. the read path)

    def open(self, peer: str, stack: contextlib.ExitStack) -> Callable[[], PeerClient]:
        return getattr(self, "_" + peer.replace("-", "_"))(stack)

    def _node(self) -> str:
        if self._node_addr is None:
            gb = max(1.0, 2 * 1.5 * self.capacity / 2**30)
            node = self.shared.enter_context(kvstore_node(str(self.workdir / "kvstore"), map_size_gb=gb))
            self._node_addr = f"{HOST}:{node.port}"
        return self._node_addr

    def _remote(self, peer: str, addr: str) -> Callable[[], PeerClient]:
        from kvclient import Client

        with Client([addr], replication=1, timeout=120, colocated=False) as probe:
            port = probe.stat()[addr].get("data_port")  # the node's data plane, if it has one
        self.details[peer] = {"read_path": "the node's data plane (TCP)" if port else "gRPC"}
        return lambda: Client([addr], replication=1, timeout=120, colocated=False)

    def _kvstore_remote(self, stack):
        return self._remote("kvstore-remote", self._node())

    def _kvstore_grpc(self, stack):
        # kvstore_node's flags plus --no-data-plane (bench.servers.kvstore_node takes no extra flags)
        argv = [PYTHON, "-m", "kvstore.cli", "serve", "--listen", f"{HOST}:0", "--data", str(self.workdir / "grpc"),
                "--map-size-gb", str(max(1.0, 1.5 * self.capacity / 2**30)), "--no-sync", "--log-level", "WARNING",
                "--no-data-plane"]
        try:
            node = stack.enter_context(ServerProcess(argv))
        except (RuntimeError, TimeoutError) as exc:
            raise PeerUnavailable(f"kvstore serve --no-data-plane did not start: {exc}") from None
        return self._remote("kvstore-grpc", f"{HOST}:{node.port}")

    def _kvstore_colocated(self, stack):
        from kvclient import Client

        # one Client per process: a process opens the node's LMDB environment once (DESIGN §4), and
        # a second co-located Client there would quietly read over gRPC
        client = stack.enter_context(Client([self._node()], replication=1, timeout=120, colocated=True))
        return lambda: SharedClient(client)

    def _redis(self, stack):
        exe = shutil.which("redis-server")
        if exe is None:
            raise PeerUnavailable("redis-server not installed (Debian package redis-server)")
        try:
            import redis
        except ImportError as exc:
            raise PeerUnavailable(f"redis-py not installed ({exc})") from None
        port, data = free_port(), tempfile.mkdtemp(prefix="redis-", dir=self.workdir)
        proc = _spawn(stack, [exe, "--bind", HOST, "--port", str(port), "--save", "", "--appendonly", "no",
                              "--dir", data, "--loglevel", "warning"], Path(data) / "redis.log")
        wait_listening(port, proc, "redis-server")
        redis.Redis(host=HOST, port=port).ping()
        return lambda: RedisPeer(port)

    def _mooncake(self, stack):
        os.environ.update(MOONCAKE_ENV)  # before the library loads, which reads them
        try:
            import mooncake
            from mooncake.store import MooncakeDistributedStore
        except (ImportError, OSError) as exc:
            raise PeerUnavailable(f"mooncake-transfer-engine-non-cuda not importable ({exc})") from None
        master_bin = Path(mooncake.__file__).parent / "mooncake_master"
        if not master_bin.exists():
            raise PeerUnavailable(f"{master_bin} missing")
        rpc, http, metrics = free_port(), free_port(), free_port()
        argv = [str(master_bin), "--enable_http_metadata_server=true", f"--http_metadata_server_host={HOST}",
                f"--http_metadata_server_port={http}", f"--rpc_address={HOST}", f"--rpc_port={rpc}",
                f"--metrics_port={metrics}", "--logtostderr"]
        master = _spawn(stack, argv, self.workdir / "mooncake_master.log")
        wait_listening(rpc, master, "mooncake_master")
        wait_listening(http, master, "mooncake_master's HTTP metadata server")
        metadata, master_addr = f"http://{HOST}:{http}/metadata", f"{HOST}:{rpc}"
        segment = int(1.5 * self.capacity) + (256 << 20)
        try:
            stack.enter_context(ServerProcess([PYTHON, "-m", "bench.peer_clients", "mooncake-holder", "--master",
                                               master_addr, "--metadata", metadata, "--segment-bytes", str(segment)]))
        except (RuntimeError, TimeoutError) as exc:
            raise PeerUnavailable(f"mooncake segment holder did not start: {exc}") from None
        store = MooncakeDistributedStore()
        block = self.layout.nbytes * self.max_batch
        if store.setup(HOST, metadata, 0, 4 * block + (64 << 20), "tcp", "", master_addr) != 0:
            raise PeerUnavailable("mooncake client setup failed")
        stack.callback(store.close)
        # one store per process, shared by the client threads (as a vLLM worker shares it)
        return lambda: MooncakePeer(store, self.layout, self.max_batch)

    def _safetensors_dir(self, stack):
        try:
            import safetensors.numpy  # noqa: F401
        except ImportError as exc:
            raise PeerUnavailable(f"safetensors not installed ({exc})") from None
        root = Path(tempfile.mkdtemp(prefix="safetensors-", dir=self.workdir))
        return lambda: SafetensorsDirPeer(root, self.layout)

    def _raw_socket(self, stack):
        srv = stack.enter_context(socket_server(f"{HOST}:0"))
        return lambda: RawSocketPeer(srv.port, self.layout)


def _hold_segment(argv: Sequence[str]) -> None:
    ap = argparse.ArgumentParser(prog="mooncake-holder")
    ap.add_argument("--master", required=True)
    ap.add_argument("--metadata", required=True)
    ap.add_argument("--segment-bytes", type=int, required=True)
    args = ap.parse_args(argv)
    os.environ.update(MOONCAKE_ENV)
    from mooncake.store import MooncakeDistributedStore

    store = MooncakeDistributedStore()
    rc = store.setup(HOST, args.metadata, args.segment_bytes, 16 << 20, "tcp", "", args.master)
    if rc != 0:
        sys.exit(f"mooncake setup returned {rc}")
    print(f"PORT {args.master.rsplit(':', 1)[1]}", flush=True)
    sys.stdin.read()  # the launcher closes stdin (or dies): unmount and go
    store.close()


if __name__ == "__main__":
    if sys.argv[1:2] != ["mooncake-holder"]:
        sys.exit("usage: python -m bench.peer_clients mooncake-holder --master H:P --metadata URL --segment-bytes N")
    _hold_segment(sys.argv[2:])
