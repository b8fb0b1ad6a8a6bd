"""kvbench: writes to an untracked folder by default, exits 3 when a checked target is not met."""

from __future__ import annotations

import json
import os
import subprocess
import time

from bench import cli
from tests.conftest import REPO


def test_default_output_is_untracked_and_make_bench_uses_it():
    ignored = subprocess.run(["git", "check-ignore", "-q", os.path.join(cli.DEFAULT_OUT, "quick", "x.json")],
                             cwd=REPO, capture_output=True)
    assert ignored.returncode == 0, f"{cli.DEFAULT_OUT} is not git-ignored"
    with open(os.path.join(REPO, "Makefile")) as f:
        bench = f.read().split("\nbench:", 1)[1].split("\n\n", 1)[0]
    assert "bench/results" not in bench and "--out bench/out/" in bench


def test_a_target_not_met_exits_3_unless_warned(tmp_path, capsys):
    assert cli.main(["economics", "--out", str(tmp_path)]) == 0  # no target checked: 0
    started = time.time() - 1
    (tmp_path / "transport.json").write_text(json.dumps({"figures": {"meets_target": False, "target_ratio": 0.7}}))
    (tmp_path / "vllm.json").write_text(json.dumps({"ratios": {"targets": [{"name": "TTFT ratio", "met": False},
                                                                          {"name": "other", "met": True}]}}))
    assert cli.unmet_targets(str(tmp_path), started) == ["transport: target ratio 0.7", "vllm: TTFT ratio"]
    assert cli.main(["economics", "--out", str(tmp_path)]) == cli.TARGETS_NOT_MET
    assert "error: NOT met: transport: target ratio 0.7" in capsys.readouterr().err
    os.utime(tmp_path / "transport.json")
    assert cli.main(["economics", "--out", str(tmp_path), "--targets", "warn"]) == 0
    assert "warning: NOT met" in capsys.readouterr().err
