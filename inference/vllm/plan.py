"""The scheduler side of the connector: which store blocks a request loads and which it publishes.

A request's prompt is cut into store blocks (``block_size`` tokens, a multiple of vLLM's block)
keyed by key spec v1 under the engine's fingerprint and the request's salt. One batched
``exists`` of every block's layer-0 record gives the stored prefix (layer 0 present ⇒ all layers:
a block's layers are written by one atomic ``put_many``). The hit is capped so that at least one
prompt token is computed. Blocks the store lacks are published as soon as a step completes them.
With ``listings`` on, a prompt whose leading blocks a readable listing names is matched first
(pure hashing, ``listings.ListingRouter``) and the listing's layer-0 listing keys join that one
``exists``; the longer stored prefix wins. A listing-routed request loads through listing keys,
each record checked against its manifest digest by the worker, and saves nothing: the loaded
prefix is the publisher's (a copy under the buyer's keys would turn one metered load into free
ones), and blocks after it would hang off a chain whose start the buyer's namespace lacks.
The plans travel to the worker in ``StoreConnectorMetadata`` (plain data: it is pickled between
the scheduler and worker processes; never network data).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata

from kvproto.errors import KVCacheError
from kvproto.keys import block_keys, record_key

from ..listing_match import ListingSource, leading_runs
from .config import ConnectorConfig, request_namespace
from .listings import ListingRoute, ListingRouter

log = logging.getLogger(__name__)


@dataclass
class BlockTransfer:
    key: bytes  # the store block's key (h_i)
    block_ids: list[int]  # the vLLM blocks that hold its tokens, in order
    skip: int = 0  # leading vLLM blocks a load leaves alone (vLLM computed them itself)
    source: ListingSource | None = None  # a listing's block: `key` is in the publisher's namespace
    listed: tuple[tuple[int, bytes], ...] = ()  # per layer, the record's manifest index and SHA-256


@dataclass
class RequestTransfer:
    req_id: str
    loads: list[BlockTransfer] = field(default_factory=list)
    saves: list[BlockTransfer] = field(default_factory=list)


@dataclass
class StoreConnectorMetadata(KVConnectorMetadata):
    requests: list[RequestTransfer] = field(default_factory=list)


@dataclass
class _Request:
    keys: list[bytes]  # every full store block of the prompt
    loadable: int  # store blocks a load may cover (one prompt token is always computed)
    stored: int | None = None  # stored prefix, in store blocks (None: not looked up yet)
    load_start: int = 0  # the token the load would start at (vLLM's own computed tokens)
    pending: tuple[int, int] | None = None  # tokens [start, end) to load in the next step
    block_ids: list[int] = field(default_factory=list)
    saved: int = 0  # store blocks stored or published
    route: ListingRoute | None = None  # the prefix comes from a listing (no saves then)
    loaded: int = 0  # tokens planned to load (reported with the prompt when listings are on)


class SchedulerSide:
    def __init__(self, config: ConnectorConfig, fingerprint: str, vllm_block_size: int, client: Any) -> None:
        self.config, self.fingerprint, self.client = config, fingerprint, client
        self.block = config.block_size
        self.per_block = config.block_size // vllm_block_size
        self.vllm_block = vllm_block_size
        self.requests: dict[str, _Request] = {}
        self.stats: Counter = Counter()
        self.router = (ListingRouter(client, dict(config.trust), config.listings_refresh_seconds, fingerprint,
                                     config.block_size) if config.listings else None)

    def _request(self, request: Any) -> _Request | None:
        state = self.requests.get(request.request_id)
        if state is not None:
            return state
        tokens = request.prompt_token_ids
        if tokens is None or getattr(request, "mm_features", None):
            return None  # embeddings or images: the token ids alone do not say what the KV is
        ns = request_namespace(self.fingerprint, self.config.tenant_salt, getattr(request, "cache_salt", None))
        keys = block_keys(ns, tokens, self.block)
        state = _Request(keys, min(len(keys), (len(tokens) - 1) // self.block))
        self.requests[request.request_id] = state
        return state

    def num_new_matched_tokens(self, request: Any, num_computed: int) -> tuple[int, bool]:
        state = self._request(request)
        if state is None:
            return 0, False
        if state.stored is None:
            state.stored = self._lookup(state, request.prompt_token_ids)
            state.saved = state.stored
        hit = min(state.stored, state.loadable) * self.block
        state.load_start = num_computed
        return max(0, hit - num_computed), False

    def _lookup(self, state: _Request, tokens: list[int]) -> int:
        if not state.keys:
            return 0
        own = [record_key(key, 0) for key in state.keys]
        route = self.router.route(tokens, state.loadable) if self.router is not None else None
        try:  # one batched lookup: the own chain, and the best listing's keys if one matched
            present = self.client.exists(own + (route.source.probe(route.keys) if route is not None else []))
        except KVCacheError as exc:
            log.warning("kvstore lookup failed, computing the prompt: %s", exc)
            self.stats["miss_tokens:store_error"] += state.loadable * self.block
            return 0
        stored, listed = leading_runs(present, len(own))
        if listed > min(stored, state.loadable):  # (no route: listed is 0)
            state.route, stored = route, listed
            self.stats["listing_routes"] += 1
        usable = min(stored, state.loadable)
        self.stats["lookup_hit_tokens"] += usable * self.block
        if usable < state.loadable:
            self.stats["miss_tokens:absent"] += (state.loadable - usable) * self.block
        return stored

    def after_alloc(self, request: Any, num_external_tokens: int) -> None:
        state = self.requests.get(request.request_id)
        if state is None:
            return
        state.pending = (state.load_start, state.load_start + num_external_tokens) if num_external_tokens else None
        state.loaded += num_external_tokens

    def build_meta(self, scheduler_output: Any) -> StoreConnectorMetadata:
        meta = StoreConnectorMetadata()
        scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            state = self.requests.get(new.req_id)
            if state is not None:
                state.block_ids = list(new.block_ids[0])
                self._plan(meta, new.req_id, state, new.num_computed_tokens + scheduled.get(new.req_id, 0))
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            state = self.requests.get(req_id)
            if state is None:
                continue
            new_ids = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                state.block_ids = list(new_ids[0]) if new_ids else []
            elif new_ids:
                state.block_ids.extend(new_ids[0])
            self._plan(meta, req_id, state, cached.num_computed_tokens[i] + scheduled.get(req_id, 0))
        return meta

    def _plan(self, meta: StoreConnectorMetadata, req_id: str, state: _Request, computed_after: int) -> None:
        transfer = RequestTransfer(req_id)
        if state.pending is not None:
            start, end = state.pending
            state.pending = None
            for j in range(start // self.block, end // self.block):
                ids = self._ids(state, j)
                if ids is None:
                    break
                skip = max(0, start - j * self.block) // self.vllm_block
                route = state.route
                transfer.loads.append(BlockTransfer(state.keys[j], ids, skip) if route is None else
                                      BlockTransfer(route.keys[j], ids, skip, route.source, route.provenance(j)))
        if self.config.save and state.route is None:
            done = min(computed_after // self.block, len(state.keys))
            while state.saved < done:
                ids = self._ids(state, state.saved)
                if ids is None:
                    break
                transfer.saves.append(BlockTransfer(state.keys[state.saved], ids))
                state.saved += 1
        if transfer.loads or transfer.saves:
            meta.requests.append(transfer)

    def _ids(self, state: _Request, j: int) -> list[int] | None:
        ids = state.block_ids[j * self.per_block : (j + 1) * self.per_block]
        return ids if len(ids) == self.per_block else None

    def finished(self, request: Any) -> None:
        state = self.requests.pop(request.request_id, None)
        if state is not None and self.router is not None:
            self.router.report(len(request.prompt_token_ids), state.loaded,
                               state.route.source.listing if state.route is not None else "")

    def close(self) -> None:
        if self.router is not None:
            self.router.close()
        self.client.close()

    def take_stats(self) -> dict[str, int]:
        out, self.stats = dict(self.stats), Counter()
        return out
