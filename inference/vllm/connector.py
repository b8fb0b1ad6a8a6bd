"""``KVStoreConnector``: vLLM (v1 connector API, 0.32 and later) loading and saving prefixes through
the KV store. Load it from outside vLLM::

    --kv-transfer-config '{"kv_connector": "KVStoreConnector",
                           "kv_connector_module_path": "inference.vllm.connector",
                           "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
                           "kv_connector_extra_config": {"nodes": ["10.0.0.5:7000"]}}'

The scheduler side (``plan.SchedulerSide``) looks a request's blocks up in one batched call and
plans loads and saves; the worker side (``worker.WorkerSide``) moves records in and out of the
paged KV tensors, in the layout read from the attention backend (``layout.PagedLayout``). Loads
belong to the step that needs them (vLLM sees them as synchronous) and run layer by layer beside
its forward: each attention layer waits for its own records only. Saves are write-behind.
Failures become recomputed blocks, never wrong KV.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1, KVConnectorMetadata, KVConnectorRole

from .config import ConfigError, ConnectorConfig, vllm_fingerprint
from .plan import SchedulerSide, StoreConnectorMetadata
from .stats import StoreConnectorStats, StorePromMetrics
from .worker import WorkerSide

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig

log = logging.getLogger(__name__)


class KVStoreConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole, kv_cache_config: "KVCacheConfig") -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        transfer = self._kv_transfer_config
        groups = getattr(kv_cache_config, "kv_cache_groups", None) or []
        if len(groups) > 1:
            raise ConfigError("KVStoreConnector: the model has several KV cache groups (sliding-window or "
                              "hybrid layers); the store keeps full-attention KV only")
        block_size = vllm_config.cache_config.block_size
        self.config = ConnectorConfig.from_extra(transfer.kv_connector_extra_config, block_size)
        self.scheduler: SchedulerSide | None = None
        self.worker: WorkerSide | None = None
        if role == KVConnectorRole.SCHEDULER:
            fingerprint = self.config.fingerprint or vllm_fingerprint(vllm_config)
            self.scheduler = SchedulerSide(self.config, fingerprint, block_size, self.config.client())
            log.info("KVStoreConnector: fingerprint %s, store block %d tokens, nodes %s", fingerprint[:16],
                     self.config.block_size, self.config.nodes)
        else:
            num_blocks = getattr(kv_cache_config, "num_blocks", 0)
            self.worker = WorkerSide(self.config, vllm_config, num_blocks, self.config.client)

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a cache: a save lost to preemption is only a later miss

    # ---- worker side ---------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        self.worker.register(kv_caches)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        meta = self._connector_metadata
        if isinstance(meta, StoreConnectorMetadata) and meta.requests:
            self.worker.start_load(meta)

    def wait_for_layer_load(self, layer_name: str) -> None:
        self.worker.wait_layer(layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any) -> None:
        meta = self._connector_metadata
        if isinstance(meta, StoreConnectorMetadata) and meta.requests:
            self.worker.save_layer(layer_name, kv_layer, meta)

    def wait_for_save(self) -> None:
        self.worker.wait_for_save()

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.worker.load_errors()

    def get_kv_connector_stats(self) -> StoreConnectorStats | None:
        side = self.worker or self.scheduler
        data = side.take_stats() if side is not None else {}
        return StoreConnectorStats(data=data) if data else None

    def shutdown(self) -> None:
        if self.worker is not None:
            self.worker.close()
        if self.scheduler is not None:
            self.scheduler.close()

    # ---- scheduler side ------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        return self.scheduler.num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        self.scheduler.after_alloc(request, num_external_tokens)

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        return self.scheduler.build_meta(scheduler_output)

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        # saves copy their blocks out in the step that completes them: vLLM may free them now
        self.scheduler.finished(request)
        return False, None

    # ---- stats ---------------------------------------------------------------------------
    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> StoreConnectorStats:
        return StoreConnectorStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config: Any, metric_types: dict, labelnames: list[str],
                           per_engine_labelvalues: dict[int, list[object]]) -> StorePromMetrics:
        return StorePromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)
