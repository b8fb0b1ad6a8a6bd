"""The worker side of the connector: store records ⇄ vLLM's paged KV tensors.

Loads: ``start_load_kv`` (before the forward that needs them) starts one thread that reads the
step's blocks layer by layer, one ``read_into`` per few layers for every request (views of a
co-located node's LMDB map, or records off gRPC, checked by their digest either way), checks
each record's header and copies it straight into its vLLM blocks (strided copies in the layout
read off the backend); ``wait_for_layer_load``
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
from kvproto import market as mk
from kvproto.errors import KVCacheError
from kvproto.keys import record_key

from ..codec import RecordError, encode, fitting_payload
from ..listing_match import rejected_entries
from .layout import PagedLayout
from .plan import RequestTransfer, StoreConnectorMetadata

log = logging.getLogger(__name__)
# layers are read in groups of at least this many records: per-read costs stay small at short
# prefixes, and long ones still arrive a layer or two at a time beside the forward
MIN_RECORDS_PER_READ = 48


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
        self.job: _LoadJob | None = None
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
        job = _LoadJob(work, len(self.caches))
        self.job = job
        job.thread = threading.Thread(target=self._run, args=(job,), name="kvstore-load", daemon=True)
        job.thread.start()

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

    def _run(self, job: "_LoadJob") -> None:
        started = time.perf_counter()
        n_layers = len(self.caches)
        records = sum(len(t.loads) for t in job.work)  # per layer
        group = max(1, min(n_layers, -(-MIN_RECORDS_PER_READ // records)))  # layers per read_into
        try:
            for first in range(0, n_layers, group):
                layers = range(first, min(first + group, n_layers))
                try:
                    self._load_layers(job, layers)
                except Exception:  # a bug: the blocks are recomputed, never used
                    log.exception("kvstore load failed")
                    for failed, transfer in zip(job.failed, job.work):
                        failed.update({b: "store_error" for b in range(len(transfer.loads)) if b not in failed})
                finally:
                    for layer in layers:
                        job.done[layer].set()
        finally:
            for event in job.done:
                event.set()
            job.seconds = time.perf_counter() - started

    def _load_layers(self, job: "_LoadJob", layers: range) -> None:
        """One read_into for these layers' records of every block still usable (before the
        request's first failed block: a later one could not be used)."""
        layout = self.layout
        usable = [min(failed, default=len(transfer.loads)) for failed, transfer in zip(job.failed, job.work)]
        wanted = [(t, b, layer) for layer in layers for t in range(len(job.work)) for b in range(usable[t])]
        if not wanted:
            return
        keys = [_read_key(job.work[t].loads[b], layer) for t, b, layer in wanted]
        shape = (2, self.kv_heads, self.block, self.head_dim)
        per_record = self.block // self.vllm_block
        delivered: set[int] = set()

        def sink(batch) -> None:
            for i, view, _ in batch:
                t, b, layer = wanted[i]
                delivered.add(i)
                if b in job.failed[t]:
                    continue
                bt = job.work[t].loads[b]
                if bt.source is not None and not _as_listed(bt, layer, view):
                    job.failed[t][b] = "provenance"
                    job.rejected.append((bt.source, bt.records[layer] if layer < len(bt.records) else -1))
                    continue
                try:
                    _, raw = fitting_payload(view, self.dtype, shape, layer)
                except RecordError as exc:
                    job.failed[t][b] = exc.reason
                    continue
                layout.scatter_record(self.caches[layer], bt.block_ids[bt.skip:],
                                      torch.frombuffer(raw, dtype=self.dtype), per_record, bt.skip)
                job.nbytes += len(view)

        try:
            self.client.read_into(keys, sink, verify=self.config.verify)
        except KVCacheError as exc:  # e.g. no replica gave an intact copy: say which below
            log.warning("kvstore load of layers %d-%d incomplete: %s", layers[0], layers[-1], exc)
        lacking = [i for i in range(len(keys)) if i not in delivered]
        if lacking:  # present but failing its digest everywhere (corrupt), or gone, or unreachable
            try:
                present = self.client.exists([keys[i] for i in lacking])
                reasons = ["corrupt" if there else "missing_layer" for there in present]
            except KVCacheError:
                reasons = ["store_error"] * len(lacking)
            for i, reason in zip(lacking, reasons):
                t, b, _ = wanted[i]
                job.failed[t].setdefault(b, reason)

    def _report_rejected(self, rejected: list) -> None:
        by_source: dict = {}
        for source, index in rejected:
            by_source.setdefault(source, []).append(index)
        for source, indices in by_source.items():
            try:
                Market(self.client).report(rejected_entries(source.listing, source.load_id, indices))
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


def _read_key(bt: Any, layer: int) -> bytes:
    key = record_key(bt.key, layer)
    return key if bt.source is None else bt.source.key(key)


def _as_listed(bt: Any, layer: int, view: memoryview) -> bool:
    """Whether a listing's record hashes to its manifest digest (SHA-256 of record key ‖ payload)."""
    digest = bt.digests[layer] if layer < len(bt.digests) else b""
    return bool(digest) and mk.record_digest(record_key(bt.key, layer), view) == digest


class _LoadJob:
    """One step's loads: the requests' transfers, per-layer completion, failures per request."""

    def __init__(self, work: list[RequestTransfer], n_layers: int) -> None:
        self.work = work
        self.done = [threading.Event() for _ in range(n_layers)]
        self.failed: list[dict[int, str]] = [{} for _ in work]  # per request: store block -> reason
        self.rejected: list[tuple[Any, int]] = []  # (listing source, manifest index) provenance refused
        self.thread: threading.Thread | None = None
        self.nbytes = 0
        self.seconds = 0.0
