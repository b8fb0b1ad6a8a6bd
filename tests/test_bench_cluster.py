"""`kvbench cluster` end to end at a small size: hosts in namespaces, etcd, a join and a leave,
three runs (edge tier, none, edge tier on small maps), the report written."""

from __future__ import annotations

import json
import shutil

import pytest

from bench import cluster
from bench.netns import netns_unavailable_reason
from bench.report import write_report


@pytest.mark.skipif(netns_unavailable_reason() is not None or not shutil.which("etcd"),
                    reason="needs root, ip netns and etcd")
def test_kvbench_cluster_small(tmp_path):
    # 8 documents of 2.4 MiB; 4 hosts own about half each; the small maps evict above ~37 MiB
    params = cluster.ClusterParams(docs=8, seconds=8.0, small_map_gb=0.06)
    report = cluster.run(params)
    write_report(report, str(tmp_path))
    doc = json.loads((tmp_path / "cluster.json").read_text())
    runs = doc["runs"]
    assert set(runs) == {"edge", "no_edge", "edge_small_map"}
    for name, r in runs.items():
        assert r["requests"] > 0 and r["bytes_read"] > 0, name
        assert set(r["events_s"]) == {"join", "leave"}
    assert runs["edge"]["failed_reads"] == 0 and runs["no_edge"]["failed_reads"] == 0
    assert runs["edge"]["local_share"] > runs["no_edge"]["local_share"]
    assert runs["edge"]["evicted_records"] == 0  # 2 GiB maps hold everything
    assert (tmp_path / "cluster.png").stat().st_size > 0 and "edge small map" in (tmp_path / "cluster.md").read_text()
