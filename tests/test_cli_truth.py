"""kvctl and kvinfer tell the truth: every failure exits non-zero, put says where it landed."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kvclient import cli as kvctl
from tests.test_client_truth_errors import _certificate


def _run(capsys, *args: str) -> tuple[int, str, str]:
    code = kvctl.main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def pair(make_node):
    nodes = [make_node() for _ in range(2)]
    return nodes, ",".join(f"127.0.0.1:{n.port}" for n in nodes)


def test_put_get_delete_exists_health_round_trip(pair, tmp_path, capsys):
    _, nodes = pair
    src = tmp_path / "in.bin"
    src.write_bytes(b"bytes of doc-1")
    code, out, err = _run(capsys, "put", "doc-1", str(src), "--nodes", nodes)  # options after the command
    assert code == 0 and out.startswith("stored 14 bytes on ") and out.count("127.0.0.1:") == 2 and not err
    code, out, _ = _run(capsys, "--nodes", nodes, "exists", "doc-1", "doc-2")
    assert code == 1 and json.loads(out) == {"doc-1": True, "doc-2": False}
    code, out, _ = _run(capsys, "health", "--nodes", nodes, "--timeout", "2")
    assert code == 0 and set(json.loads(out).values()) == {"SERVING"}
    code, out, _ = _run(capsys, "delete", "doc-1", "--nodes", nodes)
    assert code == 0 and out.strip() == "deleted 2 records"
    code, _, err = _run(capsys, "delete", "doc-1", "--nodes", nodes)
    assert code == 1 and "not found: doc-1" in err
    code, _, err = _run(capsys, "get", "doc-1", "--nodes", nodes)
    assert code == 1 and "not found" in err


def test_the_node_list_comes_from_the_environment(pair, tmp_path, capsys, monkeypatch):
    _, nodes = pair
    monkeypatch.setenv("KVCACHE_NODES", nodes)
    code, out, _ = _run(capsys, "health")
    assert code == 0 and len(json.loads(out)) == 2
    monkeypatch.delenv("KVCACHE_NODES")
    with pytest.raises(SystemExit) as exit_:
        kvctl.main(["health"])
    assert exit_.value.code == 2 and "KVCACHE_NODES" in capsys.readouterr().err


def test_put_with_a_replica_down_names_where_it_was_written(pair, tmp_path, capsys):
    node_list, nodes = pair
    node_list[1].stop(0)
    down = f"127.0.0.1:{node_list[1].port}"
    src = tmp_path / "in.bin"
    src.write_bytes(b"x" * 100)
    code, out, err = _run(capsys, "--nodes", nodes, "--timeout", "2", "put", "doc-1", str(src))
    assert code == 0 and out.strip() == f"stored 100 bytes on 127.0.0.1:{node_list[0].port}"
    assert f"not written on {down}" in err and "connection refused" in err and "kvctl repair" in err


def test_every_failure_exits_non_zero(pair, tmp_path, capsys):
    node_list, nodes = pair
    dead = "127.0.0.1:1"
    both = f"{nodes},{dead}"
    code, out, err = _run(capsys, "--nodes", both, "--timeout", "1", "stat")
    assert code == 1 and "error" in json.loads(out)[dead] and f"no answer from {dead}" in err
    code, out, _ = _run(capsys, "--nodes", both, "--timeout", "1", "health")
    assert code == 1 and json.loads(out)[dead].startswith("error: 127.0.0.1:1: connection refused")
    code, out, err = _run(capsys, "--nodes", nodes, "--timeout", "1", "rebalance", "--previous", both)
    assert code == 1 and json.loads(out)["unreachable"] == [dead] and "could not scan 127.0.0.1:1" in err
    code, out, err = _run(capsys, "--nodes", both, "--timeout", "1", "repair")
    assert code == 1 and "repair incomplete" in err
    code, _, err = _run(capsys, "--nodes", dead, "--timeout", "1", "get", "k")
    assert code == 1 and "connection refused" in err and dead in err
    code, _, err = _run(capsys, "--nodes", dead, "--timeout", "1", "delete", "k")
    assert code == 1 and "below write quorum" in err
    code, _, err = _run(capsys, "--nodes", "127.0.0.1", "get", "k")
    assert code == 1 and "has no port" in err
    code, _, err = _run(capsys, "--nodes", str(tmp_path / "cluster.json"), "get", "k")
    assert code == 1 and "does not exist" in err


def test_kvctl_process_exit_status_and_one_line(make_node):
    node = make_node()
    result = subprocess.run([sys.executable, "-m", "kvclient.cli", "stat", "--nodes", f"127.0.0.1:{node.port},127.0.0.1:1",
                             "--timeout", "1"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1


# ---- kvinfer ------------------------------------------------------------------------------------
def test_kvinfer_fails_when_no_node_answers_unless_allowed(tmp_path, capsys):
    from inference import cli as kvinfer

    prompt = tmp_path / "prompt.txt"
    prompt.write_text("hello there")
    args = ["--nodes", "127.0.0.1:1", "--model", "tiny-qwen3", "--prompt-file", str(prompt), "--max-new-tokens", "2",
            "--timeout", "1"]
    assert kvinfer.main(args) == 1
    err = capsys.readouterr().err
    assert "no node is usable" in err and "127.0.0.1:1" in err and "connection refused" in err
    assert kvinfer.main([*args, "--allow-store-down", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["cached_tokens"] == 0


def test_kvinfer_token_tls_and_timeout(make_node, tmp_path, capsys):
    from inference import cli as kvinfer

    cert, key = _certificate(tmp_path, "node", "DNS:localhost,IP:127.0.0.1")
    tokens = tmp_path / "tokens"
    tokens.write_text("secret-token tenant-a\n")
    node = make_node(tls_cert=cert, tls_key=key, auth_tokens_file=str(tokens))
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("The clearwell gives chlorine the contact time it needs. " * 3)
    args = ["--nodes", f"127.0.0.1:{node.port}", "--replication", "1", "--model", "tiny-qwen3", "--prompt-file",
            str(prompt), "--max-new-tokens", "2", "--block-size", "32", "--json", "--timeout", "5"]
    assert kvinfer.main([*args, "--token", "secret-token", "--tls-ca", cert]) == 0
    first = json.loads(capsys.readouterr().out)
    assert kvinfer.main([*args, "--token", "secret-token", "--tls-ca", cert]) == 0
    second = json.loads(capsys.readouterr().out)
    assert first["cached_tokens"] == 0 and second["cached_tokens"] > 0
    assert kvinfer.main([*args, "--tls-ca", cert]) == 1  # no token: the node refuses
    err = capsys.readouterr().err
    assert "no node is usable" in err and "UNAUTHENTICATED" in err
