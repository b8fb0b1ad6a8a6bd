"""The one report writer every scenario uses: environment capture, then JSON, Markdown and PNG.

`write_report(report, out_dir)` writes `out_dir/<scenario>.json` (the environment, the
parameters and the scenario's figures at top level), `<scenario>.md` (a table) and
`<scenario>.png` (a matplotlib figure, Agg backend).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Table:
    headers: Sequence[str]
    rows: Sequence[Sequence[Any]]


@dataclass
class Report:
    scenario: str
    params: dict[str, Any]
    figures: dict[str, Any]  # the scenario's results, written at the top level of the JSON
    table: Table
    notes: list[str] = field(default_factory=list)
    plot: Callable[[Any], None] | None = None  # draws on a matplotlib Figure
    title: str = ""


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpus() -> list[str]:
    torch = sys.modules.get("torch")  # importing torch only to look costs seconds
    if torch is not None and torch.cuda.is_available():
        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10, check=True).stdout
            return [line.strip() for line in out.splitlines() if line.strip()]
        except (OSError, subprocess.SubprocessError):
            pass
    return []


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def capture_env() -> dict[str, Any]:
    status = _git("status", "--porcelain")
    return {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "gpu": _gpus(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "grpcio": _version("grpcio"),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
    }


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if math.isinf(value) or math.isnan(value):
            return str(value)
        if value == 0 or 1e-3 <= abs(value) < 1e6:
            return f"{value:.4g}"
        return f"{value:.3e}"
    return str(value)


def markdown(report: Report, env: dict[str, Any]) -> str:
    t = report.table
    lines = [f"# {report.title or report.scenario}", ""]
    lines += ["| " + " | ".join(t.headers) + " |", "|" + "---|" * len(t.headers)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in t.rows]
    if report.notes:
        lines += [""] + [f"- {n}" for n in report.notes]
    params = ", ".join(f"{k}={v}" for k, v in report.params.items())
    gpu = ", ".join(env["gpu"]) or "none"
    commit = (env["git_commit"] or "none")[:12] + (" (dirty)" if env["git_dirty"] else "")
    lines += ["", f"Parameters: {params}", "",
              f"Environment: {env['cpu']} x{env['cpu_count']}, GPU {gpu}, Python {env['python']}, "
              f"torch {env['torch']}, transformers {env['transformers']}, commit {commit}, "
              f"load average {_load(env)}.", "",
              f"![{report.scenario}]({report.scenario}.png)", ""]
    return "\n".join(lines)


def _load(env: dict[str, Any]) -> str:
    return "/".join(f"{x:.1f}" for x in env["loadavg"]) if env.get("loadavg") else "n/a"


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and (math.isinf(value) or math.isnan(value)):
        return None  # strict JSON has no inf/nan
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def write_report(report: Report, out_dir: str | os.PathLike) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    env = capture_env()
    doc = {"scenario": report.scenario,
           "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "env": env, "params": report.params, **report.figures, "notes": report.notes}
    paths = {ext: out / f"{report.scenario}.{ext}" for ext in ("json", "md", "png")}
    paths["json"].write_text(json.dumps(_jsonable(doc), indent=2, allow_nan=False) + "\n")
    paths["md"].write_text(markdown(report, env))
    fig = plt.figure(figsize=(8, 4.5), dpi=100)
    try:
        if report.plot is not None:
            report.plot(fig)
        else:
            fig.text(0.5, 0.5, report.scenario, ha="center")
        fig.tight_layout()
        fig.savefig(paths["png"])
    finally:
        plt.close(fig)
    return paths


def load_result(out_dir: str | os.PathLike, scenario: str) -> dict[str, Any] | None:
    path = Path(out_dir) / f"{scenario}.json"
    return json.loads(path.read_text()) if path.exists() else None
