"""One step's loads on the worker, read on one thread layer by layer (``worker.WorkerSide``
starts it and accounts for it).

A few layers' records of every block still usable come in one ``read_into``; each record's
header is checked and it is copied straight into its vLLM blocks. A record that is missing,
corrupt or of the wrong dtype, shape or layer, or a store that does not answer, fails its store
block (by reason). A listing's block is read through its listing keys, and each record must
hash to its manifest digest first (``inference.listing_match.as_listed``): one that does not is a
``provenance`` failure, and its manifest index is kept for the node's rejection report.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import torch

from kvproto.errors import KVCacheError
from kvproto.keys import record_key

from ..codec import RecordError, fitting_payload
from ..listing_match import as_listed
from .plan import BlockTransfer, RequestTransfer

log = logging.getLogger(__name__)
# layers are read in groups of at least this many records: per-read costs stay small at short
# prefixes, and long ones still arrive a layer or two at a time beside the forward
MIN_RECORDS_PER_READ = 48


class LoadJob:
    """The requests' transfers, per-layer completion, failures per request. `worker`: the
    ``WorkerSide`` whose client, caches and layout the loads use."""

    def __init__(self, work: list[RequestTransfer], worker: Any) -> None:
        self.work, self.worker = work, worker
        self.done = [threading.Event() for _ in worker.caches]
        self.failed: list[dict[int, str]] = [{} for _ in work]  # per request: store block -> reason
        self.rejected: list[tuple[Any, int]] = []  # (listing source, manifest index) provenance refused
        self.nbytes = 0
        self.seconds = 0.0
        self.thread = threading.Thread(target=self._run, name="kvstore-load", daemon=True)

    def _run(self) -> None:
        started = time.perf_counter()
        n_layers = len(self.done)
        records = sum(len(t.loads) for t in self.work)  # per layer
        group = max(1, min(n_layers, -(-MIN_RECORDS_PER_READ // records)))  # layers per read_into
        try:
            for first in range(0, n_layers, group):
                layers = range(first, min(first + group, n_layers))
                try:
                    self._load_layers(layers)
                except Exception:  # a bug: the blocks are recomputed, never used
                    log.exception("kvstore load failed")
                    for failed, transfer in zip(self.failed, self.work):
                        failed.update({b: "store_error" for b in range(len(transfer.loads)) if b not in failed})
                finally:
                    for layer in layers:
                        self.done[layer].set()
        finally:
            for event in self.done:
                event.set()
            self.seconds = time.perf_counter() - started

    def _load_layers(self, layers: range) -> None:
        """One read_into for these layers' records of every block still usable (before the
        request's first failed block: a later one could not be used)."""
        w = self.worker
        usable = [min(failed, default=len(transfer.loads)) for failed, transfer in zip(self.failed, self.work)]
        wanted = [(t, b, layer) for layer in layers for t in range(len(self.work)) for b in range(usable[t])]
        if not wanted:
            return
        keys = [_read_key(self.work[t].loads[b], layer) for t, b, layer in wanted]
        shape = (2, w.kv_heads, w.block, w.head_dim)
        per_record = w.block // w.vllm_block
        delivered: set[int] = set()

        def sink(batch) -> None:
            for i, view, _ in batch:
                t, b, layer = wanted[i]
                delivered.add(i)
                if b in self.failed[t]:
                    continue
                bt = self.work[t].loads[b]
                if bt.source is not None:
                    index, digest = bt.listed[layer] if layer < len(bt.listed) else (-1, b"")
                    if not as_listed(record_key(bt.key, layer), view, digest):
                        self.failed[t][b] = "provenance"
                        self.rejected.append((bt.source, index))
                        continue
                try:
                    _, raw = fitting_payload(view, w.dtype, shape, layer)
                except RecordError as exc:
                    self.failed[t][b] = exc.reason
                    continue
                w.layout.scatter_record(w.caches[layer], bt.block_ids[bt.skip:],
                                        torch.frombuffer(raw, dtype=w.dtype), per_record, bt.skip)
                self.nbytes += len(view)

        try:
            w.client.read_into(keys, sink, verify=w.config.verify)
        except KVCacheError as exc:  # e.g. no replica gave an intact copy: say which below
            log.warning("kvstore load of layers %d-%d incomplete: %s", layers[0], layers[-1], exc)
        lacking = [i for i in range(len(keys)) if i not in delivered]
        if lacking:  # present but failing its digest everywhere (corrupt), or gone, or unreachable
            try:
                present = w.client.exists([keys[i] for i in lacking])
                reasons = ["corrupt" if there else "missing_layer" for there in present]
            except KVCacheError:
                reasons = ["store_error"] * len(lacking)
            for i, reason in zip(lacking, reasons):
                t, b, _ = wanted[i]
                self.failed[t].setdefault(b, reason)


def _read_key(bt: BlockTransfer, layer: int) -> bytes:
    key = record_key(bt.key, layer)
    return key if bt.source is None else bt.source.key(key)
