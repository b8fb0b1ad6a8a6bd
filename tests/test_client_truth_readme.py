"""The README's Python section, run as written against real nodes (KVCACHE_NODES)."""

from __future__ import annotations

import os
import re
import warnings

import pytest

from tests.conftest import REPO
from tests.test_inference_smollm2 import CAN_CONVERT, CONVERTED


def _python_blocks() -> list[str]:
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        text = f.read()
    section = text[text.index("From Python (both blocks"):text.index("## Guarantees")]
    return re.findall(r"```python\n(.*?)```", section, re.S)


@pytest.fixture
def cluster(make_node, monkeypatch):
    nodes = [make_node() for _ in range(2)]
    monkeypatch.setenv("KVCACHE_NODES", ",".join(f"127.0.0.1:{n.port}" for n in nodes))
    return nodes


def test_readme_has_the_two_blocks():
    blocks = _python_blocks()
    assert len(blocks) == 2 and "Client(" in blocks[0] and "CachedGenerator(" in blocks[1]


def test_readme_client_block_runs(cluster, capsys):
    exec(compile(_python_blocks()[0], "README.md", "exec"), {})
    assert "stored on" in capsys.readouterr().out


@pytest.mark.skipif(not (CONVERTED or CAN_CONVERT), reason="SmolLM2 is not available here")
def test_readme_inference_block_runs_without_warnings(cluster, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        exec(compile(_python_blocks()[1], "README.md", "exec"), {})
    assert "tokens reused)" in capsys.readouterr().out


def test_the_inference_example_reuses_kv(cluster, capsys):
    import runpy

    main = runpy.run_path(os.path.join(REPO, "examples", "inference_service.py"))["main"]
    assert main(["--model", "tiny-qwen3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("first: 0/") and lines[1].startswith("second: ") and not lines[1].startswith("second: 0/")


@pytest.mark.parametrize("script, args, expect", [
    ("operator_checks.py", [], "repair:"),
    ("benchmark_reader.py", ["--records", "8", "--mib", "0.25", "--rounds", "1"], "GB/s"),
])
def test_the_other_examples_run(cluster, script, args, expect):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, os.path.join(REPO, "examples", script), *args], capture_output=True,
                            text=True, timeout=120, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO})
    assert result.returncode == 0, result.stderr
    assert expect in result.stdout


def test_the_api_is_findable():
    import pydoc

    from inference import CachedGenerator, ModelUnavailable, load_model
    from kvclient import Client

    for name, member in vars(Client).items():
        if not name.startswith("_") and callable(getattr(member, "fget", member)):
            assert (getattr(member, "__doc__", None) or "").strip(), f"Client.{name} has no docstring"
    assert "# ----" not in pydoc.render_doc(Client)
    assert CachedGenerator.generate.__doc__ and "text" in CachedGenerator.generate.__doc__
    model, _ = load_model("TINY-QWEN3")  # any case
    assert model is not None
    with pytest.raises(ModelUnavailable, match="did you mean tiny-qwen3"):
        load_model("tiny-qwen")
