"""KV reuse is exact: loaded caches equal fresh prefills bitwise, reused generations equal plain ones."""

from __future__ import annotations

import threading

import pytest
import torch

from inference import CachedGenerator, KVLayout, load_prefix, plan_prefix
from inference.blocks import export_segment
from kvproto.keys import namespace
from tests.conftest_models import (  # noqa: F401  (fixtures)
    BLOCK, MODEL_IDS, MODELS, colocated_store, grpc_store, local_store, plain_tokens, prompt, store, tiny,
)


@pytest.mark.parametrize("name,dtype", MODELS, ids=MODEL_IDS)
def test_loaded_cache_equals_fresh_prefill_bitwise(name, dtype, store) -> None:
    model = tiny(name, dtype)
    gen = CachedGenerator(model, store, block_size=BLOCK, publish=False)
    ids = prompt(3 * BLOCK + 5, seed=1)
    prefix, suffix = ids[:, : 2 * BLOCK], ids[:, 2 * BLOCK :]
    with torch.inference_mode():
        fresh = model(prefix, use_cache=True).past_key_values
    plan = gen.plan(ids[0].tolist())
    for key, start, count in plan.segments()[:2]:
        store.put_many(export_segment(fresh, key, start, count))

    loaded = load_prefix(store, plan, gen.layout, model.config)
    assert (loaded.tokens, loaded.blocks, loaded.tail) == (2 * BLOCK, 2, False)
    assert loaded.reasons == {"absent": 1}
    for mine, theirs in zip(loaded.cache.layers, fresh.layers):
        assert torch.equal(mine.keys, theirs.keys) and torch.equal(mine.values, theirs.values)
    with torch.inference_mode():
        expected = model(suffix, past_key_values=fresh, use_cache=True).logits
        got = model(suffix, past_key_values=loaded.cache, use_cache=True).logits
    assert torch.equal(got, expected)


@pytest.mark.parametrize("name,dtype", MODELS, ids=MODEL_IDS)
def test_reuse_generates_the_plain_tokens(name, dtype, store) -> None:
    model = tiny(name, dtype)
    ids = prompt(3 * BLOCK + 7, seed=2)
    plain = plain_tokens(model, ids)
    with CachedGenerator(model, store, block_size=BLOCK) as gen:
        miss = gen.generate(ids, 24, do_sample=False)
        gen.flush()
        hit = gen.generate(ids, 24, do_sample=False)
    assert (miss.cached_tokens, miss.prefilled_tokens) == (0, ids.shape[1])
    assert (hit.cached_tokens, hit.prefilled_tokens) == (ids.shape[1] - 1, 1)
    assert hit.miss_reasons == {}
    assert hit.new_tokens.numel() == 24
    assert torch.equal(miss.sequences, plain) and torch.equal(hit.sequences, plain)


@pytest.mark.parametrize("name,dtype", MODELS, ids=MODEL_IDS)
def test_pipelined_reuse_generates_the_plain_tokens(name, dtype, colocated_store) -> None:
    """The forward starts while later layers are still loading: same tokens, same KV."""
    model = tiny(name, dtype)
    ids = prompt(4 * BLOCK + 3, seed=4)
    with CachedGenerator(model, colocated_store, block_size=BLOCK) as gen:
        gen.generate(ids, 2, do_sample=False)
        gen.flush()
    with CachedGenerator(model, colocated_store, block_size=BLOCK, publish=False, pipeline_loads=True) as gen:
        hit = gen.generate(ids, 24, do_sample=False)
    assert (hit.cached_tokens, hit.miss_reasons) == (ids.shape[1] - 1, {})
    assert hit.load_seconds > 0 and hit.fetched_bytes > 0
    assert torch.equal(hit.sequences, plain_tokens(model, ids))


@pytest.mark.parametrize("threads", [1, 3])
def test_parallel_copies_equal_the_fresh_prefill(threads, colocated_store) -> None:
    model = tiny("tiny-qwen3", torch.bfloat16)
    gen = CachedGenerator(model, colocated_store, block_size=BLOCK, publish=False)
    ids = prompt(5 * BLOCK, seed=6)
    with torch.inference_mode():
        fresh = model(ids, use_cache=True).past_key_values
    plan = gen.plan(ids[0].tolist())
    for key, start, count in plan.segments():
        colocated_store.put_many(export_segment(fresh, key, start, count))
    for verify in (True, False):
        loaded = load_prefix(colocated_store, plan, gen.layout, verify=verify, threads=threads)
        assert loaded.tokens == 5 * BLOCK and colocated_store.reads["colocated"] > 0
        for mine, theirs in zip(loaded.cache.layers, fresh.layers):
            assert torch.equal(mine.keys, theirs.keys) and torch.equal(mine.values, theirs.values)


@pytest.mark.parametrize("name,dtype", MODELS, ids=MODEL_IDS)
def test_partial_reuse_two_of_three_blocks(name, dtype, local_store) -> None:
    model = tiny(name, dtype)
    ids = prompt(3 * BLOCK + 9, seed=3)
    with CachedGenerator(model, local_store, block_size=BLOCK) as gen:
        gen.generate(ids[:, : 2 * BLOCK + 4], 4, do_sample=False)  # caches 2 blocks and a tail
        gen.flush()
        partial = gen.generate(ids, 24, do_sample=False)
        gen.flush()
        full = gen.generate(ids, 24, do_sample=False)
    plain = plain_tokens(model, ids)
    assert partial.cached_tokens == 2 * BLOCK and partial.miss_reasons == {"absent": 1}
    assert full.cached_tokens == ids.shape[1] - 1
    assert torch.equal(partial.sequences, plain) and torch.equal(full.sequences, plain)


def test_prompt_of_whole_blocks_keeps_one_token_to_prefill(local_store) -> None:
    model = tiny("tiny-qwen3")
    ids = prompt(2 * BLOCK, seed=4)
    with CachedGenerator(model, local_store, block_size=BLOCK) as gen:
        gen.generate(ids, 2, do_sample=False)
        gen.flush()
        hit = gen.generate(ids, 24, do_sample=False)
    assert (hit.cached_tokens, hit.prefilled_tokens) == (2 * BLOCK - 1, 1)
    assert torch.equal(hit.sequences, plain_tokens(model, ids))


def test_other_weights_dtype_or_tenant_never_hit(local_store) -> None:
    ids = prompt(2 * BLOCK + 3, seed=5)
    with CachedGenerator(tiny("tiny-qwen3"), local_store, block_size=BLOCK) as gen:
        gen.generate(ids, 2, do_sample=False)
    others = [
        CachedGenerator(tiny("tiny-qwen3", seed=1), local_store, block_size=BLOCK),
        CachedGenerator(tiny("tiny-qwen3", torch.bfloat16), local_store, block_size=BLOCK),
        CachedGenerator(tiny("tiny-llama"), local_store, block_size=BLOCK),
        CachedGenerator(tiny("tiny-qwen3"), local_store, tenant_salt=b"other", block_size=BLOCK),
    ]
    for other in others:
        result = other.generate(ids, 2, do_sample=False)
        other.close()
        assert result.cached_tokens == 0 and result.miss_reasons == {"absent": 1}
    same = CachedGenerator(tiny("tiny-qwen3"), local_store, block_size=BLOCK, publish=False)
    assert same.generate(ids, 2, do_sample=False).cached_tokens == ids.shape[1] - 1


@pytest.mark.parametrize("codec", ["zstd-byteplane", "zstd-grouped"])
def test_compressed_records_are_exact(store, codec) -> None:
    model = tiny("tiny-llama", torch.bfloat16)
    ids = prompt(2 * BLOCK + 11, seed=6)
    with CachedGenerator(model, store, block_size=BLOCK, codec=codec) as gen:
        gen.generate(ids, 2, do_sample=False)
        gen.flush()
        hit = gen.generate(ids, 24, do_sample=False)
    assert hit.cached_tokens == ids.shape[1] - 1
    assert torch.equal(hit.sequences, plain_tokens(model, ids))


class GatedStore:
    """A real store whose writes wait for a gate: shows that publishing is off the answer's path."""

    def __init__(self, inner) -> None:
        self.inner, self.gate = inner, threading.Event()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def put_many(self, items) -> None:
        assert self.gate.wait(30)
        self.inner.put_many(items)


def test_publish_is_write_behind_and_flush_waits(local_store) -> None:
    store = GatedStore(local_store)
    model = tiny("tiny-qwen3")
    ids = prompt(2 * BLOCK + 1, seed=7)
    with CachedGenerator(model, store, block_size=BLOCK) as gen:
        first = gen.generate(ids, 3, do_sample=False)  # returns while every put is held at the gate
        assert first.published is not None and not first.published.done()
        assert gen.generate(ids, 3, do_sample=False).cached_tokens == 0
        store.gate.set()
        gen.flush()
        assert first.published.done() and first.published.result() == 3  # 2 blocks + the tail
        assert gen.generate(ids, 3, do_sample=False).cached_tokens == ids.shape[1] - 1
        assert gen.stats["published_segments"] == 3


def test_batch_and_padding_are_refused(local_store) -> None:
    gen = CachedGenerator(tiny("tiny-qwen3"), local_store, block_size=BLOCK)
    with pytest.raises(ValueError, match="batch size 1"):
        gen.generate(prompt(10).repeat(2, 1), 2)
    with pytest.raises(ValueError, match="padded"):
        gen.generate(prompt(10), 2, attention_mask=torch.tensor([[0] + [1] * 9]))
    gen.close()


def test_plan_matches_the_key_spec() -> None:
    ns = namespace("00" * 32)
    plan = plan_prefix(ns, list(range(70)), 32)
    assert len(plan.block_keys) == 2 and plan.tail_tokens == 6 and plan.num_tokens == 70
    assert [(start, count) for _, start, count in plan.segments()] == [(0, 32), (32, 32), (64, 6)]
    assert plan_prefix(ns, list(range(64)), 32).tail_key is None


def test_layout_of_models() -> None:
    layout = KVLayout.of(tiny("tiny-qwen3", torch.bfloat16))
    assert (layout.num_layers, layout.kv_heads, layout.head_dim, layout.dtype) == (2, 2, 16, torch.bfloat16)
    assert layout.bytes_per_token == 2 * 2 * 2 * 16 * 2


def test_prefix_loader_is_pluggable_and_codec_checked(local_store) -> None:
    calls = []

    def loader(*args, **kwargs):
        calls.append(kwargs["max_tokens"])
        return load_prefix(*args, **kwargs)

    ids = prompt(BLOCK + 4, seed=8)
    with CachedGenerator(tiny("tiny-qwen3"), local_store, block_size=BLOCK, prefix_loader=loader) as gen:
        gen.generate(ids, 2, do_sample=False)
    assert calls == [ids.shape[1] - 1]
    with pytest.raises(ValueError, match="codec"):
        CachedGenerator(tiny("tiny-qwen3"), local_store, codec="lz4")
