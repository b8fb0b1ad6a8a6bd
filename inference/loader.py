"""The prefix loader: the cached prefix straight from any store into the model's KV buffers.

The one loader, written against ``kvproto.store.Store`` (the in-process store, the gRPC client
and the co-located path). Records are read layer-major with ``read_into``: a co-located node's
records arrive as
views of its LMDB map, in one batch per read transaction, and each is copied exactly once, into
its slot of the KV buffers on the CPU, or of a pinned staging buffer whose host-to-device copy
runs on a side stream as soon as its layer is complete (CUDA). Copies (and checksums) run on a
few threads: numpy's copy and XXH3 release the GIL, and hashing a record just before copying it
means the copy reads it from cache. The bytes are hashed once, by the store record's digest
(``kvproto.record``; over gRPC the client checked it in transit); `verify=False` skips even that
for a trusted co-located node.

Errors: a store error (``KVCacheError``) or an unusable record (``RecordError``) ends the reuse
at its block and is counted; anything else is a bug and propagates (the generator decides).

With ``background=True`` the load runs behind the forward: the cache's layers wait for their
own records only, so layer 0 computes while later layers are still arriving. Which segments
exist is known before the forward starts (one batched lookup, tail included), so a rerun happens
only when a record that was present fails under the running forward: it raises
``PrefixShortened`` before any token is produced and the caller reruns on the shorter prefix
(``LoadedPrefix.settle()``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from kvproto import record
from kvproto.errors import KVCacheError
from kvproto.keys import record_key

from .blocks import KVLayout, LoadedPrefix, PrefixPlan, available_segments, loaded_prefix, target_buffers
from .codec import CODEC_NONE, HEADER_SIZE, RecordError, decode_into, pack_header
from .kvbuffers import KVBuffers

log = logging.getLogger(__name__)
COPY_THREADS = max(1, min(4, os.cpu_count() or 1))
_pool = ThreadPoolExecutor(max_workers=COPY_THREADS + 1, thread_name_prefix="kv-load")


class PrefixShortened(RuntimeError):
    """A record of the prefix failed while the forward was already using it."""


class _Load:
    """One prefix load: copy jobs, per-layer completion, failures, and the CUDA hand-off."""

    def __init__(self, segments, layout: KVLayout, buffers: KVBuffers, verify: bool, threads: int,
                 background: bool) -> None:
        self.segments, self.layout, self.buffers = segments, layout, buffers
        self.verify, self.threads = verify, threads
        self.total = sum(count for _, _, count in segments)
        n_layers = layout.num_layers
        self.order = [(layer, s) for layer in range(n_layers) for s in range(len(segments))]
        self.remaining = [len(segments)] * n_layers
        self.layer_done = [threading.Event() for _ in range(n_layers)] if background else None
        self.failed: dict[int, str] = {}  # segment -> why it is unusable
        self.error: BaseException | None = None  # a bug: the load is void, the caller sees it
        self.keys = [record_key(segments[s][0], layer) for layer, s in self.order]  # store key per record
        self.nbytes = 0
        self.lock = threading.Lock()
        self.heads: dict[tuple[int, int], bytes] = {}
        itemsize = layout.dtype.itemsize
        self.on_cuda = layout.device.type == "cuda"
        if self.on_cuda:  # pinned staging per layer (torch's host allocator caches and reuses them)
            shape = (2, layout.kv_heads, self.total, layout.head_dim)
            self.staged = [torch.empty(shape, dtype=layout.dtype, pin_memory=True) for _ in range(n_layers)]
            self.targets = [t.view(torch.uint8).numpy() for t in self.staged]
            self.stream = _side_stream(layout.device)
            # the copies overwrite pooled buffers that earlier work on the caller's stream may still read
            self.stream.wait_stream(torch.cuda.current_stream(layout.device))
            self.shipped: list[torch.cuda.Event | None] = [None] * n_layers
        else:
            self.targets = buffers.bytes_views()
        self.row_bytes = layout.head_dim * itemsize

    # ---- records -> jobs (the read transaction's thread) --------------------------------
    def head(self, layer: int, count: int) -> tuple[bytes, int]:
        """The fixed header bytes and the length of a well-formed uncompressed record."""
        key = (layer, count)
        if key not in self.heads:
            lay = self.layout
            raw = 2 * lay.kv_heads * count * self.row_bytes
            shape = (2, lay.kv_heads, count, lay.head_dim)
            fixed = pack_header(lay.dtype, CODEC_NONE, layer, shape, raw, raw)
            self.heads[key] = (fixed, HEADER_SIZE + raw)
        return self.heads[key]

    def jobs(self, batch):
        """(layer, segment, record view, source, destination, digest to check) per record; odd
        ones (compressed, or not what the model needs) are decoded here."""
        for index, view, digest in batch:
            layer, s = self.order[index]
            _, start, count = self.segments[s]
            dest = self.targets[layer][:, :, start : start + count]
            digest = digest if self.verify else None
            fixed, length = self.head(layer, count)
            if len(view) == length and view[:HEADER_SIZE] == fixed:  # the common case: one comparison
                src = np.frombuffer(view, np.uint8, offset=HEADER_SIZE).reshape(dest.shape)
                yield layer, s, index, view, src, dest, digest
            else:  # compressed, or wrong: the codec's own checks name the reason
                ok = self.decode_odd(layer, s, index, view, dest, digest)
                yield layer, s, index, view if ok else None, None, None, None

    def decode_odd(self, layer: int, s: int, index: int, view: memoryview, dest: np.ndarray,
                   digest: bytes | None) -> bool:
        try:
            if digest is not None:
                record.check(self.keys[index], view, digest)
            decode_into(view, torch.from_numpy(dest).view(self.layout.dtype), layer=layer)
            return True
        except RecordError as exc:
            self.fail(s, exc.reason)
        except KVCacheError as exc:
            log.warning("KV record (layer %d): %s", layer, exc)
            self.fail(s, "corrupt")
        return False

    def copy(self, job) -> None:
        """Check and copy one record (GIL released in both), then count its layer down."""
        layer, s, index, view, src, dest, digest = job
        if src is not None:
            if digest is not None and record.digest(self.keys[index], view) != digest:
                log.warning("KV record (layer %d) failed its checksum", layer)
                self.fail(s, "corrupt")
                view = None
            else:
                np.copyto(dest, src)
        self.count_down(layer, len(view) if view is not None else 0)

    def count_down(self, layer: int, nbytes: int = 0) -> None:
        """One more record of `layer` is settled (copied or failed); the last one completes it."""
        with self.lock:
            self.nbytes += nbytes
            self.remaining[layer] -= 1
            complete = self.remaining[layer] == 0
        if complete:
            self.complete(layer)

    def sink(self, batch) -> None:
        """Copy a batch on up to `threads` threads; returns when no job is running any more (the
        views die then). Helpers that start late find no job left: the batch never waits for them."""
        jobs = self.jobs(batch)
        cond = threading.Condition()
        state: dict = {"active": 0, "done": False, "error": None}

        def work() -> None:
            while True:
                with cond:  # the job generator is not thread-safe
                    if state["done"]:
                        return
                    try:
                        job = next(jobs, None)
                    except BaseException as exc:  # a bug, not a bad record: raised by the sink
                        state["error"], job = exc, None
                    if job is None:
                        state["done"] = True
                        return
                    state["active"] += 1
                try:
                    self.copy(job)
                except BaseException as exc:  # a bug in a helper thread: raised by the sink, never lost
                    with cond:
                        state["error"], state["done"] = state["error"] or exc, True
                finally:
                    with cond:
                        state["active"] -= 1
                        cond.notify_all()

        for _ in range(min(self.threads, len(batch)) - 1):
            _pool.submit(work)
        work()
        with cond:
            cond.wait_for(lambda: state["done"] and not state["active"])
        if state["error"] is not None:
            raise state["error"]

    # ---- completion ------------------------------------------------------------------------
    def fail(self, s: int, reason: str) -> None:
        with self.lock:
            self.failed.setdefault(s, reason)

    def complete(self, layer: int) -> None:
        if self.on_cuda:
            dest = self.buffers.layers[layer][:, 0, :, : self.total]
            with torch.cuda.device(self.layout.device), torch.cuda.stream(self.stream):
                dest.copy_(self.staged[layer], non_blocking=True)
                dest.record_stream(self.stream)  # a free before the join must not recycle it under the copy
                event = torch.cuda.Event()
                event.record(self.stream)
            self.shipped[layer] = event
        if self.layer_done is not None:
            self.layer_done[layer].set()

    def missing(self, found: list[bool]) -> None:
        for i, ok in enumerate(found):
            if not ok:
                layer, s = self.order[i]
                self.fail(s, "absent" if layer == 0 else "missing_layer")
                self.count_down(layer)

    def join_stream(self) -> None:
        """The caller's stream waits for every host-to-device copy issued so far."""
        torch.cuda.current_stream(self.layout.device).wait_stream(self.stream)

    def wait_layer(self, layer: int) -> None:
        self.layer_done[layer].wait()
        if self.on_cuda and self.shipped[layer] is not None:
            torch.cuda.current_stream(self.layout.device).wait_event(self.shipped[layer])


_streams: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    if device not in _streams:
        _streams[device] = torch.cuda.Stream(device=device)
    return _streams[device]


def load_prefix(
    client, plan: PrefixPlan, layout: KVLayout, config=None, max_tokens: int | None = None, verify: bool = True,
    buffers: KVBuffers | None = None, background: bool = False, threads: int = COPY_THREADS,
) -> LoadedPrefix:
    """Fetch the longest cached prefix of `plan` (at most `max_tokens` of it) into `buffers`
    (sized to the stored prefix if not given) through `client.read_into` (any ``Store``).

    `verify=False` trusts the co-located node's copy (it verified every record on receipt) and
    skips hashing on the hot path. Records fetched over gRPC are verified in transit either way.
    `background=True` returns as soon as the stored prefix is known, with a cache whose layers
    wait for their records (see the module notes).
    """
    started = time.perf_counter()
    lookup_reasons: Counter = Counter()  # why the stored prefix ends; moot if a record fails first
    try:
        segments = available_segments(client, plan, lookup_reasons)
    except KVCacheError as exc:  # a store failure is a miss, never a failed request
        log.warning("KV lookup failed: %s", exc)
        segments, lookup_reasons = [], Counter(store_error=1)
    total = sum(count for _, _, count in segments)
    buffers = target_buffers(layout, total, buffers)
    if not total:
        return loaded_prefix(plan, [], buffers, max_tokens, 0, lookup_reasons, started)
    load = _Load(segments, layout, buffers, verify, threads, background)

    def run() -> LoadedPrefix:
        try:
            load.missing(client.read_into(load.keys, load.sink, verify=False))
        except KVCacheError as exc:  # a store failure is a miss, never a failed request
            log.warning("fetching KV blocks failed: %s", exc)
            with load.lock:
                load.failed[0] = "store_error"
        except BaseException as exc:  # a bug: no layer may wait for it, and the caller sees it
            load.error = exc
            raise
        finally:
            for layer in range(layout.num_layers):  # never leave a waiting forward hanging
                if load.remaining[layer] > 0:
                    load.remaining[layer] = 0
                    load.complete(layer)
        if load.on_cuda and not background:
            load.join_stream()
        return _settled(load, plan, buffers, max_tokens, lookup_reasons, started, background)

    if not background:
        return run()
    planned = total if max_tokens is None else min(total, max_tokens)
    future: Future = _pool.submit(run)
    last = layout.num_layers - 1

    def ready(layer: int):
        def wait() -> None:
            load.wait_layer(layer)
            if layer == last:
                future.result()  # every record checked before the last layer computes
            if load.error is not None:
                raise load.error
            if load.failed:
                raise PrefixShortened(f"KV record failed ({sorted(set(load.failed.values()))}) during the forward")
        return wait

    cache = buffers.cache(planned, ready=[ready(layer) for layer in range(layout.num_layers)])
    return LoadedPrefix(cache, planned, 0, False, 0, Counter(), buffers, pending=future)


def _settled(load: _Load, plan, buffers, max_tokens, lookup_reasons: Counter, started: float,
             background: bool) -> LoadedPrefix:
    usable_segments = min(load.failed) if load.failed else len(load.segments)
    reasons = Counter({load.failed[usable_segments]: 1}) if load.failed else Counter(lookup_reasons)
    # settled in the loader's thread: a forward rerun on this cache (CUDA) first joins the copies
    ready = [load.join_stream] * len(buffers.layers) if background and load.on_cuda else None
    return loaded_prefix(plan, load.segments[:usable_segments], buffers, max_tokens, load.nbytes, reasons,
                         started, ready)
