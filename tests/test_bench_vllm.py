"""Smoke test of `kvbench vllm`: the report (rows, ratios against the targets, table, files) on
synthetic engine results, and one real `--quick` run of the cheap configurations (no connector
and vLLM's ExampleConnector, 256-token documents: four engine starts)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from bench import cli, vllm_bench, vllm_report
from bench.report import Report, write_report


def _engine(role: str, ttft: dict[int, float], cached: bool, tokens: list[int]) -> dict:
    prompts = []
    for n, t in ttft.items():
        sample = {"ttft_s": t, "cpu_s": t, "num_cached_tokens": n if cached else 0, "token": tokens[:1],
                  "reset_ok": True}
        p = {"name": f"{n}", "length": n, "prompt_tokens": n + 20, "samples": [sample, dict(sample, ttft_s=3 * t)]}
        if role == "reader":
            p.update(check_tokens=tokens, check_cached=n)
        else:
            p.update(reference_tokens=[5, 6, 7], reference_cached=n)
        prompts.append(p)
    return {"status": "measured", "role": role, "prompts": prompts}


def _config(name: str, reader: dict[int, float], tokens=(5, 6, 7)) -> dict:
    return {"config": name, "status": "measured", "reason": None,
            "publisher": _engine("publisher", {n: 2.0 for n in reader}, False, list(tokens)),
            "reader": _engine("reader", reader, name != "none", list(tokens))}


def test_report_on_synthetic_results(tmp_path):
    p = vllm_bench.VllmParams(lengths=(1024, 4096))
    results = [_config("none", {1024: 1.0, 4096: 10.0}), _config("kvstore-colocated", {1024: 0.1, 4096: 1.0}),
               {"config": "kvstore-grpc", "status": "failed", "reason": "ImportError: no connector"},
               _config("example", {1024: 2.0, 4096: 0.5}, tokens=(5, 6, 8)),
               _config("mooncake", {1024: 0.2, 4096: 2.0})]
    rows = vllm_report.summarize(results)
    by = {(r["config"], r["length"]): r for r in rows}
    assert by[("none", 4096)]["reader_ttft_s"] == 20.0  # the median of two runs (10 s and 30 s)
    assert by[("kvstore-colocated", 1024)]["tokens_equal_prefix_cache"] is True
    assert by[("kvstore-colocated", 1024)]["tokens_equal_full_prefill"] is True
    assert by[("example", 1024)]["tokens_equal_prefix_cache"] is False  # another 16-token continuation
    assert by[("kvstore-grpc", None)]["status"] == "failed"
    rat = vllm_report.ratios(rows, p)
    assert rat["reader_ttft_over_none"]["4096"]["kvstore-colocated"] == pytest.approx(0.1)
    targets = {t["name"]: t for t in rat["targets"]}
    assert targets["kvstore-colocated / none, reader TTFT at 4096 tokens"]["met"] is True
    assert targets["kvstore-colocated / example, reader TTFT at 4096 tokens"]["met"] is False  # 1.0 vs 0.5
    assert targets["kvstore-grpc / none, reader TTFT at 4096 tokens"]["met"] is None  # not measured
    report = Report("vllm", {}, {"rows": rows, "ratios": rat}, vllm_report.table(rows),
                    vllm_report.notes(rows, results, p, rat), vllm_report.plot(rows, p))
    paths = write_report(report, tmp_path)
    md = paths["md"].read_text()
    assert "kvstore-grpc | - |" in md and "failed: ImportError: no connector" in md and "NOT met" in md
    assert paths["png"].stat().st_size > 0 and json.loads(paths["json"].read_text())["ratios"]["targets"]


def test_prompts_share_documents_not_first_blocks():
    from inference.models import ModelUnavailable, smollm2_dir

    try:
        model_dir = smollm2_dir()
    except ModelUnavailable as exc:
        pytest.skip(str(exc))
    prompts = vllm_bench.build_prompts(model_dir, (256, 1024))
    pub, read = prompts["publisher"]["prompts"], prompts["reader"]["prompts"]
    for a, b in zip(pub, read):
        assert a["ids"][:a["length"]] == b["ids"][:b["length"]] and a["ids"] != b["ids"]  # same doc, new question
    assert pub[0]["ids"][:128] != pub[1]["ids"][:128] != prompts["publisher"]["warmup"]["ids"][:128]
    assert vllm_bench.build_prompts(model_dir, (256, 1024)) == prompts  # deterministic


@pytest.mark.vllm
@pytest.mark.timeout(420)
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed (make venv)")
def test_quick_run_none_and_example(tmp_path):
    cli.main(["vllm", "--quick", "--lengths", "256", "--configs", "none,example", "--out", str(tmp_path),
              "--no-progress"])
    doc = json.loads((tmp_path / "vllm.json").read_text())
    rows = {r["config"]: r for r in doc["rows"]}
    assert set(rows) == {"none", "example"} and doc["versions"]["cpu_count"]
    for r in rows.values():
        assert r["status"] == "measured", r
        assert r["reader_ttft_s"] > 0 and r["publisher_ttft_s"] > 0 and len(r["check_tokens"]) == 16
        assert r["tokens_equal_prefix_cache"] is True
    assert rows["none"]["reader_cached_tokens"] == [0]
    assert rows["example"]["reader_cached_tokens"] == [256]  # the document came from the connector
    assert (tmp_path / "vllm.png").stat().st_size > 0 and "| example | 256 |" in (tmp_path / "vllm.md").read_text()
