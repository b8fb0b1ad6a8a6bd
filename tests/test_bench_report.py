"""The shared report writer: valid JSON (environment included), a Markdown table, a PNG."""

from __future__ import annotations

import json
import math

from bench.report import Report, Table, capture_env, load_result, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _report(**kw) -> Report:
    def plot(fig):
        fig.add_subplot(1, 1, 1).plot([1, 2, 3], [3, 1, 2])

    base = dict(scenario="demo", params={"n": 3}, figures={"ratio": 0.5, "never": math.inf, "rows": [{"a": 1}]},
                table=Table(["name", "value"], [["x", 1.23456], ["y", math.inf], ["z", 1e-9]]),
                notes=["a note"], plot=plot, title="Demo")
    base.update(kw)
    return Report(**base)


def test_writes_json_md_png(tmp_path):
    paths = write_report(_report(), tmp_path / "out")
    doc = json.loads(paths["json"].read_text())
    assert doc["scenario"] == "demo" and doc["ratio"] == 0.5 and doc["rows"] == [{"a": 1}]
    assert doc["never"] is None  # strict JSON: inf becomes null
    assert doc["params"] == {"n": 3} and doc["notes"] == ["a note"]
    for key in ("cpu", "gpu", "python", "torch", "transformers", "git_commit", "loadavg"):
        assert key in doc["env"]
    md = paths["md"].read_text()
    assert "| name | value |" in md and "| x | 1.235 |" in md and "- a note" in md
    assert "![demo](demo.png)" in md
    assert paths["png"].read_bytes()[:8] == PNG_MAGIC
    assert load_result(tmp_path / "out", "demo")["ratio"] == 0.5
    assert load_result(tmp_path / "out", "missing") is None


def test_without_plot_still_writes_png(tmp_path):
    paths = write_report(_report(plot=None), tmp_path)
    assert paths["png"].read_bytes()[:8] == PNG_MAGIC


def test_env_names_cpu_and_versions():
    import platform
    import subprocess

    import torch

    env = capture_env()
    assert env["cpu"] and env["python"] == platform.python_version() and env["cpu_count"] >= 1
    assert env["torch"] == torch.__version__.split("+")[0] or env["torch"] == torch.__version__
    assert env["git_commit"] == subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert isinstance(env["gpu"], list) and (env["gpu"] != []) == torch.cuda.is_available()
