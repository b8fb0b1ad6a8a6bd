"""kvinfer against real nodes: --verify reports exact tokens; errors are one readable line."""

from __future__ import annotations

import json

import pytest

from inference import cli
from kvstore.config import ServerConfig
from kvstore.server import create_server
from tests.conftest import wait_healthy

TEXT = "The clearwell gives chlorine the contact time it needs. " * 6


@pytest.fixture
def two_nodes(tmp_path):
    servers = []
    for i in range(2):
        server, port = create_server(
            ServerConfig(listen="127.0.0.1:0", data_dir=str(tmp_path / f"n{i}"), sync=False, map_size_gb=1.0)
        )
        wait_healthy(f"127.0.0.1:{port}")
        servers.append((server, port))
    yield ",".join(f"127.0.0.1:{port}" for _, port in servers)
    for server, _ in servers:
        server.node.stop(0)


def test_verify_json_against_real_nodes(tmp_path, two_nodes, capsys) -> None:
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(TEXT)
    args = ["--nodes", two_nodes, "--model", "tiny-qwen3", "--prompt-file", str(prompt), "--max-new-tokens", "24",
            "--block-size", "64", "--verify", "--json"]
    assert cli.main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["exact"] is True and out["tokens_compared"] == 24
    assert out["cached_tokens"] == out["prompt_tokens"] - 1 == len(TEXT.encode()) - 1
    assert out["max_logit_diff"] < 1e-3
    for field in ("prefill_seconds", "reuse_seconds", "fetch_seconds", "speedup", "kv_bytes_per_token"):
        assert out[field] > 0
    # a second process-level run finds everything cached already
    assert cli.main(args[:-2] + ["--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["cached_tokens"] == out["prompt_tokens"] - 1 and again["miss_reasons"] == {}


def test_embedded_text_output(tmp_path, capsys) -> None:
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(TEXT)
    args = ["--embedded", "2", "--model", "tiny-llama", "--dtype", "bfloat16", "--prompt-file", str(prompt),
            "--max-new-tokens", "8", "--block-size", "32", "--codec", "zstd-byteplane", "--verify"]
    assert cli.main(args) == 0
    text = capsys.readouterr().out
    assert "exact: True (8 tokens)" in text and "cached" in text


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--model", "no-such-model"], "unknown model"),
        (["--model", "tiny-qwen3", "--prompt-tokens", "100000"], "fewer than --prompt-tokens"),
    ],
)
def test_errors_are_one_line(tmp_path, capsys, extra, message) -> None:
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(TEXT)
    code = cli.main(["--local", str(tmp_path / "db"), "--prompt-file", str(prompt), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and message in err and err.startswith("kvinfer: error:")


def test_missing_prompt_file_is_one_line(tmp_path, capsys) -> None:
    code = cli.main(["--local", str(tmp_path / "db"), "--model", "tiny-qwen3", "--prompt-file", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and "No such file" in err
