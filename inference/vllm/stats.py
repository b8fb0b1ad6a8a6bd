"""The connector's counters, as vLLM carries them: ``KVConnectorStats`` from the scheduler and
the workers, summed, then logged and exported to Prometheus (``vllm:kvstore_*`` on vLLM's own
``/metrics``, or ``LLM.get_metrics()`` offline).

Keys of the data dict: ``hit_tokens`` (loaded into vLLM), ``lookup_hit_tokens`` (found by the
scheduler), ``listing_hit_tokens`` (the part of ``hit_tokens`` loaded from listings),
``listing_routes`` (requests a listing supplied), ``miss_tokens:<reason>`` (absent, store_error,
corrupt, missing_layer, dtype_mismatch, shape_mismatch, layer_mismatch, bad_header, provenance: a
listing's record that does not hash to its manifest digest), ``load_bytes``, ``load_seconds_us``,
``save_bytes``, ``save_seconds_us``, ``saved_blocks``, ``save_errors``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats
from vllm.v1.metrics.utils import create_metric_per_engine

MISS = "miss_tokens:"
PLAIN = {
    "hit_tokens": ("vllm:kvstore_hit_tokens", "Prompt tokens loaded from the KV store", 1),
    "lookup_hit_tokens": ("vllm:kvstore_lookup_hit_tokens", "Prompt tokens the KV store had at lookup", 1),
    "listing_hit_tokens": ("vllm:kvstore_listing_hit_tokens", "Prompt tokens loaded from market listings", 1),
    "listing_routes": ("vllm:kvstore_listing_routes", "Requests whose prefix a market listing supplied", 1),
    "load_bytes": ("vllm:kvstore_load_bytes", "Bytes of KV records loaded", 1),
    "load_seconds_us": ("vllm:kvstore_load_seconds", "Seconds spent loading KV records", 1e-6),
    "save_bytes": ("vllm:kvstore_save_bytes", "Bytes of KV records written", 1),
    "save_seconds_us": ("vllm:kvstore_save_seconds", "Seconds spent writing KV records", 1e-6),
    "saved_blocks": ("vllm:kvstore_saved_blocks", "Store blocks written (all layers)", 1),
    "save_errors": ("vllm:kvstore_save_errors", "Store blocks that could not be written", 1),
}
REASONS = ("absent", "store_error", "corrupt", "missing_layer", "dtype_mismatch", "shape_mismatch",
           "layer_mismatch", "bad_header", "provenance")


@dataclass
class StoreConnectorStats(KVConnectorStats):
    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> "StoreConnectorStats":
        total = Counter(self.data)
        total.update(other.data)
        return StoreConnectorStats(data=dict(total))

    def reduce(self) -> dict[str, int | float]:
        return dict(self.data)

    def is_empty(self) -> bool:
        return not any(self.data.values())


class StorePromMetrics(KVConnectorPromMetrics):
    def __init__(self, vllm_config: Any, metric_types: dict, labelnames: list[str],
                 per_engine_labelvalues: dict[int, list[object]]) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self.plain = {
            key: (create_metric_per_engine(self._counter_cls(name=name, documentation=doc, labelnames=labelnames),
                                           per_engine_labelvalues), scale)
            for key, (name, doc, scale) in PLAIN.items()
        }
        miss = self._counter_cls(name="vllm:kvstore_miss_tokens", documentation="Prompt tokens the KV store "
                                 "could not supply, by reason", labelnames=[*labelnames, "reason"])
        self.miss = {
            reason: {idx: miss.labels(*values, reason) for idx, values in per_engine_labelvalues.items()}
            for reason in REASONS
        }

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for key, value in transfer_stats_data.items():
            if not value:
                continue
            if key in self.plain:
                metrics, scale = self.plain[key]
                metrics[engine_idx].inc(value * scale)
            elif key.startswith(MISS) and key[len(MISS):] in self.miss:
                self.miss[key[len(MISS):]][engine_idx].inc(value)
