"""The fast load path: the cached prefix straight from the store into the model's KV tensors.

Records are read layer-major with ``client.read_into``, so a co-located node's records arrive as
views of its LMDB map and are copied exactly once: into the destination tensor on the CPU, or
into a pinned staging buffer whose host-to-device copy runs asynchronously while the next layer
is being copied (on CUDA). The bytes are hashed once: the KV codec's checksum (which covers them
from encode to decode) is checked, and the store's envelope checksum is skipped on the
co-located path (gRPC still checks its own in transit).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import torch

from kvclient.keys import record_key

from .blocks import KVLayout, LoadedPrefix, PrefixPlan, _available_segments, target_buffers
from .codec import RecordError, decode_into, parse_header
from .kvbuffers import KVBuffers

log = logging.getLogger(__name__)
STAGING_BUFFERS = 4


@dataclass
class _Pending:
    """Per-layer bookkeeping while records arrive."""

    remaining: int
    failed: str | None = None


class _Staging:
    """Pinned host buffers feeding asynchronous host-to-device copies, one per layer in flight.

    Records normally arrive layer by layer, so a few buffers cycle; a layer still waiting for a
    record (one that came over gRPC, say) keeps its buffer and another one is allocated.
    """

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
        self.shape, self.dtype = shape, dtype
        self.buffers: list[torch.Tensor] = []
        self.events: list[torch.cuda.Event | None] = []
        self.owner: list[int | None] = []
        self.stream = torch.cuda.Stream(device=device)
        self.slot_of: dict[int, int] = {}

    def buffer_for(self, layer: int) -> torch.Tensor:
        if layer not in self.slot_of:
            free = [i for i, o in enumerate(self.owner) if o is None]
            if free and len(self.owner) >= STAGING_BUFFERS:
                slot = free[0]
                if self.events[slot] is not None:
                    self.events[slot].synchronize()  # its previous layer has left for the device
            else:
                self.buffers.append(torch.empty(self.shape, dtype=self.dtype, pin_memory=True))
                self.events.append(None)
                self.owner.append(None)
                slot = len(self.buffers) - 1
            self.owner[slot] = layer
            self.slot_of[layer] = slot
        return self.buffers[self.slot_of[layer]]

    def ship(self, layer: int, dest: torch.Tensor) -> None:
        slot = self.slot_of.pop(layer, None)
        if slot is None:  # no record of this layer arrived
            return
        staged = self.buffers[slot]
        with torch.cuda.stream(self.stream):
            dest.copy_(staged, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        self.events[slot] = event
        self.owner[slot] = None

    def finish(self) -> None:
        torch.cuda.current_stream().wait_stream(self.stream)


def load_prefix_fast(
    client, plan: PrefixPlan, layout: KVLayout, config, max_tokens: int | None = None, verify: bool = True,
    buffers: KVBuffers | None = None,
) -> LoadedPrefix:
    """Like ``blocks.load_prefix``, through ``client.read_into`` (co-located map or gRPC).

    `verify=False` trusts the co-located node's copy (it verified every record on receipt) and
    skips hashing on the hot path: on a GPU host the hash costs as much as the whole load.
    Records fetched over gRPC are still verified in transit either way.
    """
    reasons: Counter = Counter()
    lookup_reasons: Counter = Counter()  # why the stored prefix ends; moot if a record fails first
    segments = _available_segments(client, plan, lookup_reasons)
    total = sum(count for _, _, count in segments)
    n_layers = layout.num_layers
    buffers = target_buffers(layout, total, buffers)
    on_cuda = layout.device.type == "cuda" and total > 0
    staging = _Staging((2, layout.kv_heads, total, layout.head_dim), layout.dtype, layout.device) if on_cuda else None
    pending = [_Pending(len(segments)) for _ in range(n_layers)]
    seg_failed: dict[int, str] = {}
    nbytes = 0
    # layer-major: layer 0 of every block, then layer 1, ... so each layer completes early
    order = [(layer, s) for layer in range(n_layers) for s in range(len(segments))]
    store_keys = [record_key(segments[s][0], layer) for layer, s in order]

    def sink(index: int, view: memoryview) -> None:
        nonlocal nbytes
        layer, s = order[index]
        _, start, count = segments[s]
        try:
            header = parse_header(view)
            if header.layer != layer:
                raise RecordError("layer_mismatch", f"record of layer {header.layer} stored as layer {layer}")
            if staging is not None:
                dest = staging.buffer_for(layer)[:, :, start : start + count]
            else:
                dest = buffers.span(layer, start, count)
            decode_into(view, dest, header, verify)
            nbytes += len(view)
        except RecordError as exc:
            seg_failed.setdefault(s, exc.reason)
        pending[layer].remaining -= 1
        if staging is not None and pending[layer].remaining == 0:
            staging.ship(layer, buffers.span(layer, 0, total))

    try:
        found = client.read_into(store_keys, sink, verify=False) if store_keys else []
    except Exception as exc:  # a store failure is a miss, never a failed request
        log.warning("fetching KV blocks failed: %s", exc)
        reasons["store_error"] += 1
        found, segments = [], []
    for i, ok in enumerate(found):
        if not ok:
            layer, s = order[i]
            seg_failed.setdefault(s, "absent" if layer == 0 else "missing_layer")
            if staging is not None and pending[layer].remaining > 0:
                pending[layer].remaining -= 1
                if pending[layer].remaining == 0:
                    staging.ship(layer, buffers.span(layer, 0, total))
    if staging is not None:
        staging.finish()
    usable_segments = min(seg_failed) if seg_failed else len(segments)
    if seg_failed:
        reasons[seg_failed[usable_segments]] += 1
    else:
        reasons.update(lookup_reasons)
    loaded = sum(count for _, _, count in segments[:usable_segments])
    tail_start = len(plan.block_keys) * plan.block_size
    tail = any(start >= tail_start for _, start, _ in segments[:usable_segments])
    blocks = usable_segments - int(tail)
    usable = loaded if max_tokens is None else min(loaded, max_tokens)
    return LoadedPrefix(buffers.cache(usable), usable, blocks, tail, nbytes, reasons, buffers)
