"""The worker side of the connector: store records ⇄ vLLM's paged KV tensors.

Loads: ``start_load_kv`` (before the forward that needs them) starts one thread
(``loads.LoadJob``) that reads the step's blocks layer by layer, one ``read_into`` per few
layers for every request (views of a co-located node's LMDB map, or records off gRPC, checked by
their digest either way), checks each record's header and copies it straight into its vLLM
blocks (strided copies in the layout read off the backend); ``wait_for_layer_load``
holds layer L's attention until layer L's records are in. A record that is missing, corrupt or of
the wrong dtype, shape or layer, or a store that does not answer, fails its store block: that
block's and every later block's vLLM blocks are reported by ``get_block_ids_with_load_errors``
and vLLM recomputes them (``kv_load_failure_policy: "recompute"``); the failure is counted by
reason.
A block of a listing (``BlockTransfer.source``) is read through listing keys and every record's
SHA-256 is checked against the manifest digest the scheduler sent before it is copied: a record
that fails is a ``provenance`` miss, failing its block like a corrupt one; the rejected records
are reported to the node (which credits them if the stored record really differs).

Saves: ``save_kv_layer`` gathers each newly completed store block out of the layer's cache (a
copy, so vLLM may free the blocks at once); ``wait_for_save`` hands complete blocks (all layers)
to one background thread that encodes them and writes each block with one ``put_many``
(write-behind: the forward never waits for the network).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from kvclient.market import Market
from kvproto.errors import KVCacheError
from kvproto.keys import record_key

from ..codec import encode
from ..listing_match import rejected_entries
from .layout import PagedLayout
from .loads import LoadJob
from .plan import StoreConnectorMetadata

log = logging.getLogger(__name__)


def _layer_index(name: str) -> int:
    from vllm.model_executor.models.utils import extract_layer_index

    return extract_layer_index(name)


class WorkerSide:
    def __init__(self, config: Any, vllm_config: Any, num_blocks: int, client_factory) -> None:
        self.config, self.vllm_config = config, vllm_config
        self.num_blocks = num_blocks
        self.vllm_block = vllm_config.cache_config.block_size
        self.block = config.block_size
        self._client_factory = client_factory
        self._client = None
        self.names: list[str] = []  # attention layers in layer order
        self.caches: list[torch.Tensor] = []
        self.layout: PagedLayout | None = None
        self.failed_block_ids: set[int] = set()
        self.job: LoadJob | None = None
        self.pending: dict[tuple[str, bytes], list[torch.Tensor | None]] = {}
        self.saver = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvstore-save")
        self.stats: Counter = Counter()
        self.lock = threading.Lock()
        self.kv_heads = vllm_config.model_config.get_num_kv_heads(vllm_config.parallel_config)
        self.head_dim = vllm_config.model_config.get_head_size()
        self.dtype = None

    @property
    def client(self):
        if self._client is None:
            self._client = self._client_factory()
        return self._client

    def register(self, kv_caches: dict[str, torch.Tensor]) -> None:
        order = sorted(kv_caches, key=_layer_index)
        self.names = order
        self.caches = [kv_caches[name] for name in order]
        self.index = {name: i for i, name in enumerate(order)}
        self.dtype = self.caches[0].dtype

    def _layout(self) -> PagedLayout:
        if self.layout is None:
            layer = self.vllm_config.compilation_config.static_forward_context[self.names[0]]
            self.layout = PagedLayout.probe(layer, self.caches[0], self.num_blocks, self.vllm_block,
                                            self.kv_heads, self.head_dim)
        return self.layout

    # ---- loads ---------------------------------------------------------------------------
    def start_load(self, meta: StoreConnectorMetadata) -> None:
        """Start this step's loads on a thread, layer by layer: layer L's attention waits for
        layer L's records only (``wait_layer``), so later layers arrive while earlier ones compute."""
        work = [t for t in meta.requests if t.loads]
        if not work:
            return
        self._layout()  # probe (once) on this thread, before any copy runs beside the forward
        self.finish_loads()
        self.job = LoadJob(work, self)
        self.job.thread.start()

    def wait_layer(self, name: str) -> None:
        job, layer = self.job, self.index.get(name)
        if job is not None and layer is not None:
            job.done[layer].wait()

    def finish_loads(self) -> None:
        """Wait for the step's loads; account their failures (vLLM recomputes those blocks)."""
        job, self.job = self.job, None
        if job is None:
            return
        job.thread.join()
        for t, (transfer, failed) in enumerate(zip(job.work, job.failed)):
            loads = transfer.loads
            usable = min(failed) if failed else len(loads)
            for b in range(usable, len(loads)):
                self.failed_block_ids.update(loads[b].block_ids[loads[b].skip:])
            with self.lock:
                self.stats["hit_tokens"] += sum(self.block - bt.skip * self.vllm_block for bt in loads[:usable])
                self.stats["listing_hit_tokens"] += sum(self.block - bt.skip * self.vllm_block
                                                        for bt in loads[:usable] if bt.source is not None)
                for b in range(usable, len(loads)):
                    reason = failed.get(b, failed[usable]) if failed else "store_error"
                    self.stats[f"miss_tokens:{reason}"] += self.block - loads[b].skip * self.vllm_block
        with self.lock:
            self.stats["load_bytes"] += job.nbytes
            self.stats["load_seconds_us"] += int(job.seconds * 1e6)
        if job.rejected:
            self.saver.submit(self._report_rejected, job.rejected)

    def _report_rejected(self, rejected: list) -> None:
        """One Report of a step's rejected records ((listing source, manifest index) each)."""
        entries = [e for source, index in rejected for e in rejected_entries(source.listing, source.load_id, [index])]
        try:
            Market(self.client).report(entries)
        except KVCacheError as exc:  # a lost report costs the buyer a credit, never an answer
            log.warning("kvstore rejection report failed: %s", exc)

    def load_errors(self) -> set[int]:
        self.finish_loads()
        out, self.failed_block_ids = self.failed_block_ids, set()
        return out

    # ---- saves ---------------------------------------------------------------------------
    def save_layer(self, name: str, kv_layer: torch.Tensor, meta: StoreConnectorMetadata) -> None:
        layer = self.index.get(name)
        if layer is None:
            return
        for transfer in meta.requests:
            for bt in transfer.saves:
                slot = self.pending.setdefault((transfer.req_id, bt.key), [None] * len(self.caches))
                ids = torch.tensor(bt.block_ids, dtype=torch.int64, device=kv_layer.device)
                slot[layer] = self._layout().gather(kv_layer, ids)

    def wait_for_save(self) -> None:
        self.finish_loads()
        # a block is saved in the step that completes it, every layer of it, or not at all
        pending, self.pending = self.pending, {}
        ready = [(key, layers) for (_, key), layers in pending.items() if all(t is not None for t in layers)]
        if len(ready) < len(pending):
            with self.lock:
                self.stats["save_errors"] += len(pending) - len(ready)
        if not ready:
            return
        host = [(key, [t.to("cpu", non_blocking=True) for t in layers]) for key, layers in ready]
        if self.caches and self.caches[0].device.type == "cuda":
            torch.cuda.current_stream().synchronize()
        self.saver.submit(self._put, host)

    def _put(self, blocks: list[tuple[bytes, list[torch.Tensor]]]) -> None:
        for key, layers in blocks:
            started = time.perf_counter()
            try:
                items = [(record_key(key, layer), encode(kv[0], kv[1], layer)) for layer, kv in enumerate(layers)]
                self.client.put_many(items)
            except KVCacheError as exc:
                log.warning("kvstore save failed (the block stays uncached): %s", exc)
                with self.lock:
                    self.stats["save_errors"] += 1
                continue
            except Exception:  # a bug: log it, never take the engine down for a cache write
                log.exception("kvstore save failed")
                with self.lock:
                    self.stats["save_errors"] += 1
                continue
            with self.lock:
                self.stats["saved_blocks"] += 1
                self.stats["save_bytes"] += sum(len(v) for _, v in items)
                self.stats["save_seconds_us"] += int((time.perf_counter() - started) * 1e6)

    def take_stats(self) -> dict[str, int]:
        with self.lock:
            out, self.stats = dict(self.stats), Counter()
        return out

    def flush(self, timeout: float = 60.0) -> None:
        """Wait for the saves handed over so far."""
        self.saver.submit(lambda: None).result(timeout=timeout)

    def close(self) -> None:
        try:
            self.finish_loads()
            self.flush()
        finally:
            self.saver.shutdown(wait=True)
            if self._client is not None:
                self._client.close()
