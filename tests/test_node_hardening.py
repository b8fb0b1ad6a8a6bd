"""A node that keeps its files private, its directory to itself, its metrics where it listens,
its counts per tenant, a full disk as RESOURCE_EXHAUSTED, and every bad flag as one line."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
import urllib.request

import pytest

from kvclient.node import Credentials, NodeConnection
from kvproto.errors import QuotaExceeded
from kvstore.datadir import DataDirError
from kvstore.storage import IncomingRecord, Storage
from tests.conftest import REPO

TOKEN_A = "token-of-tenant-alice-0123456789ab"
TOKEN_B = "token-of-tenant-bob-0123456789abcd"
MiB = 1 << 20
ROOT = os.geteuid() == 0


def _mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def tokens_file(tmp_path):
    path = tmp_path / "tokens.txt"
    path.write_text(f"{TOKEN_A} alice\n{TOKEN_B} bob\n")
    return str(path)


def _kvstore(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvstore.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


# ---- files private by default ----------------------------------------------------------------
@pytest.mark.parametrize("colocated,modes", [(None, (0o700, 0o600)), (True, (0o750, 0o640))])
def test_data_directory_and_files_are_private(make_node, tokens_file, tmp_path, colocated, modes):
    data = tmp_path / "node"
    data.mkdir(mode=0o777)  # an existing, too open directory is tightened
    node = make_node(data_dir=str(data), auth_tokens_file=tokens_file, colocated=colocated)
    NodeConnection(f"127.0.0.1:{node.port}", Credentials(TOKEN_A)).put([(b"k" * 34, b"secret")], 10.0)
    assert _mode(str(data)) == modes[0]
    for name in ("data.mdb", "lock.mdb", "kvstore.lock"):
        assert _mode(str(data / name)) == modes[1], name


@pytest.mark.skipif(not ROOT, reason="needs root to run a command as another user (nobody)")
def test_another_local_user_cannot_read_the_files(make_node, tokens_file):
    parent = tempfile.mkdtemp()
    os.chmod(parent, 0o755)  # a directory anyone may pass through
    try:
        node = make_node(data_dir=os.path.join(parent, "node"), auth_tokens_file=tokens_file)
        NodeConnection(f"127.0.0.1:{node.port}", Credentials(TOKEN_A)).put([(b"k" * 34, b"secret")], 10.0)
        target = os.path.join(parent, "node", "data.mdb")
        done = subprocess.run(["su", "nobody", "-s", "/bin/sh", "-c", f"cat {target} > /dev/null"],
                              capture_output=True, text=True, timeout=30)
        assert done.returncode != 0 and "Permission denied" in done.stderr
    finally:
        shutil.rmtree(parent, ignore_errors=True)


# ---- one node per data directory -------------------------------------------------------------
def test_a_second_node_on_a_live_directory_is_refused(spawn_node, make_node):
    node = spawn_node("held")
    second = _kvstore("serve", "--listen", "127.0.0.1:0", "--data", node.data_dir, "--no-sync")
    assert second.returncode == 2 and "Traceback" not in second.stderr
    [line] = second.stderr.strip().splitlines()
    assert f"in use by node pid {node.proc.pid} at 127.0.0.1:0" in line and node.data_dir in line
    with pytest.raises(DataDirError, match="in use by node pid"):
        make_node(data_dir=node.data_dir)
    node.terminate()  # the lock goes with its holder
    node.start()


def test_an_empty_data_flag_is_refused(tmp_path):
    done = subprocess.run([sys.executable, "-m", "kvstore.cli", "serve", "--data", ""], capture_output=True,
                          text=True, cwd=str(tmp_path), timeout=60)
    assert done.returncode == 2 and "--data is empty" in done.stderr
    assert not os.path.exists(tmp_path / "data.mdb")
    with pytest.raises(DataDirError):
        Storage("", 1 << 24)


# ---- exposure ----------------------------------------------------------------------------------
def test_metrics_bind_the_listen_host_unless_told(make_node, caplog):
    caplog.set_level("INFO", logger="kvstore.server")
    node = make_node(metrics_port=0)
    assert node.metrics_server.server_address[0] == "127.0.0.1"
    assert f"metrics on http://127.0.0.1:{node.metrics_port}/metrics" in caplog.text
    text = urllib.request.urlopen(f"http://127.0.0.1:{node.metrics_port}/metrics", timeout=5).read().decode()
    assert "kvstore_needs_rebuild 0.0" in text and "kvstore_open_streams" in text
    wide = make_node(metrics_port=0, metrics_host="0.0.0.0")
    assert wide.metrics_server.server_address[0] == "0.0.0.0"


def test_stat_shows_each_tenant_its_own_counts(make_node, tokens_file):
    node = make_node(auth_tokens_file=tokens_file)
    alice = NodeConnection(f"127.0.0.1:{node.port}", Credentials(TOKEN_A))
    bob = NodeConnection(f"127.0.0.1:{node.port}", Credentials(TOKEN_B))
    try:
        before = bob.stat(5.0)
        alice.put([(bytes([i]) * 34, os.urandom(1000)) for i in range(5)], 10.0)
        bob.put([(b"b" * 34, b"x")], 10.0)
        a, b = alice.stat(5.0), bob.stat(5.0)
        assert a.tenant_scoped and (a.records, b.records, before.records) == (5, 1, 0)
        assert a.used_bytes > 5000 > b.used_bytes > 0
    finally:
        alice.close()
        bob.close()


# ---- a full disk ----------------------------------------------------------------------------
@pytest.fixture
def small_fs():
    if not ROOT:
        pytest.skip("needs root to mount a 64 MiB tmpfs")
    mount = tempfile.mkdtemp()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", mount], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", mount], check=False)
        os.rmdir(mount)


def test_a_full_disk_is_resource_exhausted_and_writes_resume(make_node, small_fs):
    """A 1 GiB map on a 64 MiB filesystem, eviction off: RESOURCE_EXHAUSTED, reads served,
    writes resume after deletes."""
    node = make_node(data_dir=os.path.join(small_fs, "n"), map_size_gb=1.0, high_water=1.0, data_port=None)
    conn = NodeConnection(f"127.0.0.1:{node.port}")
    try:
        stored = []
        with pytest.raises(QuotaExceeded, match="disk full"):
            for i in range(100):
                key = b"%034d" % i
                conn.put([(key, os.urandom(MiB))], 30.0)
                stored.append(key)
        assert 40 < len(stored) < 64
        assert all(v is not None for _, v, _ in conn.get(stored[:5], 10.0))
        assert conn.delete(stored[:10], 10.0) == 10
        conn.put([(b"after" * 7, os.urandom(MiB))], 30.0)
        assert conn.lookup([b"after" * 7], 5.0) == [True]
    finally:
        conn.close()
    node.stop(0)  # the data survives a restart
    storage = Storage(os.path.join(small_fs, "n"), 1 << 30, high_water=1.0)
    try:
        assert storage.get(stored[20]) is not None and storage.get(b"after" * 7) is not None
    finally:
        storage.close()


def test_eviction_counts_the_free_disk(tmp_path, small_fs):
    """With eviction on, a disk smaller than the map never fills: old blocks go first."""
    storage = Storage(os.path.join(small_fs, "e"), 1 << 30, sync=False, high_water=0.9)
    try:
        for i in range(160):  # 160 MiB through a 64 MiB disk
            storage.put_batch([IncomingRecord.of(b"%032d" % i + bytes(2), os.urandom(MiB))])
        assert storage.get(b"%032d" % 159 + bytes(2)) is not None
        assert storage.stats().evicted_records > 90
    finally:
        storage.close()


# ---- every flag validated up front --------------------------------------------------------
@pytest.mark.parametrize("args,needle", [
    (["--log-level", "FOO"], "--log-level: 'FOO' is not one of"),
    (["--map-size-gb", "100000"], "choose a smaller --map-size-gb"),
    (["--map-size-gb", "0"], "--map-size-gb must be above 0"),
    (["--max-record-mb", "-1"], "--max-record-mb must be above 0"),
    (["--metrics-port", "70000"], "--metrics-port must be at least 0 and at most 65535"),
    (["--stream-idle-seconds", "0"], "--stream-idle-seconds must be above 0"),
    (["--auth-tokens", "/nonexistent/tokens"], "--auth-tokens /nonexistent/tokens: no such file"),
])
def test_bad_flags_are_one_line(tmp_path, args, needle):
    done = _kvstore("serve", "--listen", "127.0.0.1:0", "--data", str(tmp_path / "d"), *args)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert needle in done.stderr.strip().splitlines()[-1], done.stderr


def test_a_garbage_certificate_is_named(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    key.write_text("garbage\n")
    done = _kvstore("serve", "--listen", "127.0.0.1:0", "--data", str(tmp_path / "d"),
                    "--tls-cert", str(cert), "--tls-key", str(key))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    [line] = done.stderr.strip().splitlines()
    assert "not a PEM certificate" in line and str(cert) in line and "Failed to bind" not in line
