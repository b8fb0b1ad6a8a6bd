"""CachedGenerator: generate with the longest cached KV prefix, publish what was new (write-behind,
``inference.writebehind``). ``GenerationResult``, ``FirstTokenClock`` and ``CACHE_KWARG`` live in
``inference.results`` and are importable from here too."""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from transformers import StaticCache

from kvproto.keys import DEFAULT_BLOCK_SIZE, namespace

from .blocks import KVLayout, LoadedPrefix, PrefixPlan, plan_prefix
from .codec import CODECS
from .fingerprint import fingerprint
from .graphs import CHUNKED_PREFILL, static_cache
from .kvbuffers import KVArena
from .loader import PrefixShortened, load_prefix
from .results import CACHE_KWARG, FirstTokenClock, GenerationResult
from .writebehind import WriteBehind

log = logging.getLogger(__name__)


class CachedGenerator(WriteBehind):
    """Token-exact generation that reuses KV from any ``kvproto.store.Store``."""

    def __init__(
        self,
        model: torch.nn.Module,
        client: Any,
        tokenizer: Any = None,
        tenant_salt: bytes = b"",
        block_size: int = DEFAULT_BLOCK_SIZE,
        codec: str = "none",
        publish: bool = True,
        prefix_loader: Callable[..., LoadedPrefix] | None = None,
        verify_loads: bool = True,
        kv_pool_bytes: int = 4 << 30,
        pipeline_loads: bool | None = None,
        *,
        internal_errors: str = "count",
        graphs: bool | None = None,
        listings: Any = None,
    ) -> None:
        """`client` is any ``kvproto.store.Store``. `prefix_loader(client, plan, layout, config,
        max_tokens=, buffers=, background=)` fetches the cached prefix into `buffers`: by default
        ``inference.loader.load_prefix``.

        A store error or an unusable record is a counted miss. Anything else the load or the
        publish raises is a bug: `internal_errors="raise"` (tests) lets it through; "count" (the
        default, for production) logs it with its traceback, counts `internal_error` and answers
        the request by a full prefill.

        `graphs` runs the model on a static cache over the same KV buffers, so that transformers
        captures the decode step with CUDA graphs (torch.compile "reduce-overhead"); by default
        (None) on for a model on a CUDA device. Elsewhere it only changes the cache type.

        Each request's KV lives in buffers sized for prompt + new tokens; up to `kv_pool_bytes`
        of them are kept warm for the next request (0: a fresh allocation every time).
        `pipeline_loads` starts the forward while the fast path is still loading later layers. By
        default (None) it is on where the load has hardware of its own to run on: a model on an
        accelerator, or a CPU model whose torch threads leave a core free; with every core
        computing, the load and the forward only contend for the cores and memory bandwidth."""
        if block_size <= 0:
            raise ValueError("block_size must be positive")
        if codec not in CODECS:
            raise ValueError(f"unknown codec {codec!r} (have {sorted(CODECS)})")
        if internal_errors not in ("count", "raise"):
            raise ValueError(f"internal_errors must be 'count' or 'raise', got {internal_errors!r}")
        self.internal_errors = internal_errors
        self.listings = listings  # inference.listings.ListingReader: prefixes other tenants published
        self.graphs = graphs if graphs is not None else next(model.parameters()).device.type == "cuda"
        self.model = model
        self.client = client
        self.tokenizer = tokenizer
        self.block_size = block_size
        self.codec = codec
        self.publish = publish
        self.layout = KVLayout.of(model)
        self.pipeline_loads = pipeline_loads
        self.prefix_loader = prefix_loader or functools.partial(load_prefix, verify=verify_loads)
        self.arena = KVArena(self.layout, keep=1, max_bytes=kv_pool_bytes)
        self.fingerprint = fingerprint(model, tokenizer)
        self.namespace = namespace(self.fingerprint, tenant_salt)
        self.stats: Counter = Counter()
        self._stats_lock = threading.Lock()
        self._start_write_behind()

    def plan(self, tokens: list[int]) -> PrefixPlan:
        """The block keys of `tokens` in this generator's namespace (what a lookup asks for)."""
        return plan_prefix(self.namespace, tokens, self.block_size)

    def prompt_ids(self, prompt: Any) -> tuple[torch.Tensor, Any]:
        """Token ids [1, T] of a prompt, and its attention mask if it came with one.

        `prompt`: token ids (a tensor [T] or [1, T], or a list of ints), a tokenizer's output
        (``BatchEncoding`` / dict with "input_ids", or a ``tokenizers.Encoding``), or text. Text is
        encoded as is with the generator's tokenizer (no chat template: apply one first with
        ``inference.models.encode_prompt(tokenizer, text, vocab, chat=True)``); without a tokenizer
        each UTF-8 byte is a token (the tiny test models)."""
        mask = None
        if isinstance(prompt, str):
            from .models import encode_prompt

            vocab = self.model.config.get_text_config().vocab_size
            return encode_prompt(self.tokenizer, prompt, vocab, chat=False), None
        if hasattr(prompt, "ids") and not torch.is_tensor(prompt) and not isinstance(prompt, (list, tuple)):
            prompt = prompt.ids  # tokenizers.Encoding
        elif hasattr(prompt, "keys") and "input_ids" in prompt.keys():
            prompt, mask = prompt["input_ids"], prompt.get("attention_mask")
        return torch.as_tensor(prompt, dtype=torch.long), mask

    def generate(self, input_ids: Any, max_new_tokens: int, **generate_kwargs: Any) -> GenerationResult:
        """Generate up to `max_new_tokens` after the prompt, reusing its longest cached prefix.

        `input_ids`: token ids, a tokenizer's output, or text (see ``prompt_ids``); batch size 1.
        Extra keyword arguments go to the model's ``generate`` (e.g. ``do_sample=False``); the
        cache arguments are this class's. The result says how many prompt tokens came from the
        store (``cached_tokens``) and why the rest did not (``miss_reasons``); after a miss the new
        blocks are published in the background (``result.published``, or ``flush()``)."""
        ids, given_mask = self.prompt_ids(input_ids)
        if given_mask is not None and "attention_mask" not in generate_kwargs:
            generate_kwargs["attention_mask"] = given_mask
        ids = ids.unsqueeze(0) if ids.dim() == 1 else ids
        if ids.dim() != 2 or ids.shape[0] != 1:
            raise ValueError(f"CachedGenerator handles batch size 1, got input_ids of shape {tuple(ids.shape)}")
        if ids.shape[1] == 0:
            raise ValueError("empty prompt")
        mask = generate_kwargs.pop("attention_mask", None)
        if mask is not None and not bool(torch.as_tensor(mask).all()):
            raise ValueError("padded prompts are not supported (attention_mask must be all ones)")
        for reserved in ("past_key_values", "cache", "use_cache"):
            if reserved in generate_kwargs:
                raise ValueError(f"{reserved} is managed by CachedGenerator")
        tokens = ids[0].tolist()
        plan = self.plan(tokens)
        store = self.client
        if self.listings is not None:  # a published document may hold a longer prefix
            plan, store = self.listings.route(tokens, plan, self)

        started = time.perf_counter()
        buffers = self.arena.take(len(tokens) + min(max(0, max_new_tokens), 4096))  # past that it grows
        try:
            result = self._generate(ids, tokens, plan, buffers, started, max_new_tokens, generate_kwargs, store)
        except BaseException:
            self.arena.give(buffers)
            raise
        if result.published is None:
            self.arena.give(buffers)
        else:  # the write-behind reads the cache: the buffers go back once it is done
            result.published.add_done_callback(lambda _: self.arena.give(buffers))
        return result

    def _generate(self, ids, tokens, plan, buffers, started, max_new_tokens, generate_kwargs,
                  store=None) -> GenerationResult:
        store = self.client if store is None else store
        load = functools.partial(self.prefix_loader, store, plan, self.layout, self.model.config,
                                 max_tokens=len(tokens) - 1, buffers=buffers)
        try:
            prefix = load(background=self.pipelined())
        except Exception as exc:  # noqa: BLE001 - a bug in the load: see internal_errors
            prefix = self._load_failed(exc, load)
        fetch_seconds = time.perf_counter() - started

        clock = FirstTokenClock(generate_kwargs.pop("streamer", None))
        ids = ids.to(self.layout.device)
        started = time.perf_counter()
        needed = len(tokens) + max(0, max_new_tokens)
        used: dict = {}

        def run(loaded: LoadedPrefix):
            used["cache"] = cache = self._model_cache(loaded, needed)
            return self._run_model(ids, max_new_tokens, clock, generate_kwargs, cache, ids.shape[1] - loaded.tokens)

        try:
            try:
                out = run(prefix)
            except PrefixShortened as exc:  # a record failed under a running forward: redo on what is usable
                log.info("%s; generating again on the usable prefix", exc)
                with self._stats_lock:
                    self.stats["load_reruns"] += 1
                prefix = prefix.settle()
                clock.restart()
                out = run(prefix)
            except Exception as exc:  # noqa: BLE001 - a bug in a pipelined load: see internal_errors
                if prefix.pending is None:
                    raise  # the model's own error, not the load's
                prefix = self._load_failed(exc, load)
                clock.restart()
                out = run(prefix)
        finally:
            try:
                prefix = prefix.settle()  # no load may still write into buffers that go back to the pool
            except Exception as exc:  # noqa: BLE001
                prefix = self._load_failed(exc, load)
        prefill_seconds = (clock.first_token_at or time.perf_counter()) - started

        own = store is self.client
        published = self._publish_new(plan, prefix, used.get("cache", prefix.cache)) if self.publish and own else None
        self._count(prefix, len(tokens))
        result = GenerationResult(
            sequences=out.sequences,
            prompt_tokens=len(tokens),
            cached_tokens=prefix.tokens,
            prefilled_tokens=len(tokens) - prefix.tokens,
            fetch_seconds=fetch_seconds,
            prefill_seconds=prefill_seconds,
            fetched_bytes=prefix.bytes,
            load_seconds=prefix.seconds,
            miss_reasons=prefix.reasons,
            logits=getattr(out, "logits", None),
            published=published,
        )
        if self.listings is not None:
            self.listings.settled(store, result)
        return result

    def _load_failed(self, exc: Exception, load) -> LoadedPrefix:
        """A bug in the load: raise it (tests), or log it, count it and go on without the prefix."""
        if self.internal_errors == "raise":
            raise exc
        log.error("internal error while loading KV; answering by a full prefill", exc_info=exc)
        with self._stats_lock:
            self.stats["internal_error"] += 1
        buffers = load.keywords["buffers"]
        return LoadedPrefix(buffers.cache(0), 0, 0, False, 0, Counter(internal_error=1), buffers)

    def _model_cache(self, prefix: LoadedPrefix, needed: int):
        """The cache the model runs on: a static one over the same buffers where the decode step
        is captured (`graphs`), else the loader's DynamicCache of ReservedLayers."""
        if not self.graphs or prefix.buffers is None:
            return prefix.cache
        ready = [layer.wait_ready for layer in prefix.cache.layers]
        static = static_cache(prefix.buffers.kv, prefix.tokens, needed, ready)
        if static is None:
            with self._stats_lock:
                self.stats["graphs_skipped"] += 1
            return prefix.cache
        return static

    def pipelined(self) -> bool:
        """Whether this request's load runs behind its forward (see `pipeline_loads`)."""
        if self.pipeline_loads is not None:
            return self.pipeline_loads
        return self.layout.device.type != "cpu" or torch.get_num_threads() < (os.cpu_count() or 1)

    def _run_model(self, ids, max_new_tokens, clock, generate_kwargs, cache, uncached: int):
        if isinstance(cache, StaticCache) and CHUNKED_PREFILL and uncached == 1:
            # the first token after a load is a one-token step too: a one-token "chunk" goes
            # through the same compiled (captured) forward as the decode steps
            generate_kwargs = {"prefill_chunk_size": 1, **generate_kwargs}
        with torch.inference_mode():
            return self.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                **{CACHE_KWARG: cache},
                use_cache=True,
                max_new_tokens=max_new_tokens,
                streamer=clock,
                return_dict_in_generate=True,
                **generate_kwargs,
            )

    def _count(self, prefix: LoadedPrefix, prompt_tokens: int) -> None:
        with self._stats_lock:
            self.stats["requests"] += 1
            self.stats["prompt_tokens"] += prompt_tokens
            self.stats["cached_tokens"] += prefix.tokens
            self.stats.update({f"miss_{reason}": n for reason, n in prefix.reasons.items()})

    def __enter__(self) -> "CachedGenerator":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
