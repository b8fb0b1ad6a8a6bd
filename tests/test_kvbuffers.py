"""KV buffers with room to grow: in-place appends are exact, and pooled buffers are never shared."""

from __future__ import annotations

import threading

import pytest
import torch
from transformers import DynamicCache

from inference import CachedGenerator, KVLayout
from inference.blocks import export_segment
from inference.kvbuffers import KVArena, KVBuffers, ReservedLayer, round_capacity
from kvstore.local import LocalStore
from tests.conftest_models import (  # noqa: F401  (fixtures)
    BLOCK, colocated_store, local_store, plain_tokens, prompt, tiny,
)


def test_reserved_cache_grows_past_its_capacity_and_stays_exact() -> None:
    model = tiny("tiny-qwen3")
    ids = prompt(40, seed=5)
    buffers = KVBuffers(KVLayout.of(model), 8)  # far too small: every layer has to grow
    with torch.inference_mode():
        reserved = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=buffers.cache(0),
                                  max_new_tokens=16, do_sample=False, return_dict_in_generate=True, output_logits=True)
        plain = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=DynamicCache(),
                               max_new_tokens=16, do_sample=False, return_dict_in_generate=True, output_logits=True)
    assert torch.equal(reserved.sequences, plain.sequences)
    for a, b in zip(reserved.logits, plain.logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for mine, theirs in zip(reserved.past_key_values.layers, plain.past_key_values.layers):
        assert isinstance(mine, ReservedLayer) and mine.capacity >= 40 + 15
        assert torch.equal(mine.keys, theirs.keys) and torch.equal(mine.values, theirs.values)


def test_reserved_layer_appends_in_place_crops_and_resets() -> None:
    keys, values = torch.zeros(1, 2, 10, 4), torch.zeros(1, 2, 10, 4)
    waited = []
    layer = ReservedLayer(keys, values, 3, ready=lambda: waited.append(True))
    new = torch.ones(1, 2, 2, 4)
    k, v = layer.update(new, 2 * new)
    assert waited == [True] and layer.get_seq_length() == 5 and k.shape == (1, 2, 5, 4)
    assert k.data_ptr() == keys.data_ptr() and torch.equal(keys[:, :, 3:5], new)  # written in place
    layer.update(new, new)
    assert waited == [True]  # the readiness wait runs once
    layer.crop(-4)
    assert layer.get_seq_length() == 3 and layer.keys.shape[-2] == 3
    layer.update(3 * new, new)
    assert torch.equal(keys[:, :, 3:5], 3 * new)
    layer.reset()
    assert layer.get_seq_length() == 0
    layer.update(new[:, :, :1], new[:, :, :1])
    assert layer.get_seq_length() == 1 and layer.keys.data_ptr() == keys.data_ptr()


def test_arena_reuses_the_smallest_fitting_buffers_and_bounds_memory() -> None:
    layout = KVLayout(2, 1, 4, torch.float32, torch.device("cpu"))
    arena = KVArena(layout, keep=2, max_bytes=10 << 20)
    small, big = arena.take(100), arena.take(3000)
    assert (small.capacity, big.capacity) == (round_capacity(100), round_capacity(3000)) == (1024, 3072)
    arena.give(small)
    arena.give(big)
    assert arena.take(2000) is big and arena.take(10) is small
    assert arena.reused == 2
    huge = KVArena(layout, keep=1, max_bytes=1000)
    buffers = huge.take(10)
    huge.give(buffers)
    assert huge.take(10) is not buffers  # over max_bytes: not kept


class SlowStore(LocalStore):
    """A real LMDB store whose writes wait for a signal, to hold a publish in flight."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.go = threading.Event()

    def put_many(self, items):
        self.go.wait(30)
        return super().put_many(items)


def test_buffers_of_a_publishing_request_are_not_lent_to_the_next(tmp_path) -> None:
    model = tiny("tiny-qwen3")
    store = SlowStore(str(tmp_path / "lmdb"), map_size_gb=1.0)
    first, second = prompt(2 * BLOCK, seed=11), prompt(2 * BLOCK, seed=12)
    with CachedGenerator(model, store, block_size=BLOCK) as gen:
        a = gen.generate(first, 4, do_sample=False)
        assert a.published is not None and not a.published.done()
        gen.generate(second, 4, do_sample=False)  # must not overwrite the KV being published
        assert gen.arena.allocated == 2
        store.go.set()
        gen.flush()
        with torch.inference_mode():
            fresh = model(first, use_cache=True).past_key_values
        for key, start, count in gen.plan(first[0].tolist()).segments():
            for stored_key, expected in export_segment(fresh, key, start, count):
                assert store.get(stored_key) == expected
        reused = gen.generate(first, 4, do_sample=False)
    assert reused.cached_tokens == 2 * BLOCK - 1
    assert torch.equal(reused.sequences, plain_tokens(model, first, 4))
    assert gen.arena.reused >= 1
    store.close()


def test_a_failed_request_waits_for_its_load_before_lending_the_buffers(colocated_store) -> None:
    """generate raising with a pipelined load in flight: the load ends before the buffers go back."""
    model = tiny("tiny-llama")
    ids = prompt(6 * BLOCK + 1, seed=21)
    with CachedGenerator(model, colocated_store, block_size=BLOCK) as gen:
        gen.generate(ids, 1, do_sample=False)
        gen.flush()
    gen = CachedGenerator(model, colocated_store, block_size=BLOCK, publish=False, pipeline_loads=True)
    with pytest.raises(ValueError):
        gen.generate(ids, 4, do_sample=False, num_beams=0)  # refused inside transformers' generate
    assert gen.arena.allocated == 1 and gen.arena.take(ids.shape[1] + 4) is not None
    assert gen.arena.reused == 1  # the failed request's buffers came back, with no load writing into them
    ok = gen.generate(ids, 4, do_sample=False)
    assert ok.cached_tokens == ids.shape[1] - 1 and torch.equal(ok.sequences, plain_tokens(model, ids, 4))


@pytest.mark.parametrize("pipelined", [False, True], ids=["sync", "pipelined"])
def test_static_cache_over_the_kv_buffers_is_exact(local_store, pipelined) -> None:
    """graphs=True (what a CUDA model gets by default, for CUDA-graph decode steps) runs on a
    StaticCache over the loaded buffers: the same tokens as plain generate, and what it computed
    is what gets published."""
    model = tiny("tiny-qwen3")
    ids = prompt(3 * BLOCK + 9, seed=31)
    plain = plain_tokens(model, ids, 16)
    with CachedGenerator(model, local_store, block_size=BLOCK, graphs=True, pipeline_loads=pipelined) as gen:
        miss = gen.generate(ids, 16, do_sample=False)
        gen.flush()
        hit = gen.generate(ids, 16, do_sample=False)
        longer = torch.cat([ids, prompt(BLOCK, seed=32)], dim=1)
        extended = gen.generate(longer, 16, do_sample=False)
    assert gen.stats["graphs_skipped"] == 0
    assert torch.equal(miss.sequences, plain) and torch.equal(hit.sequences, plain)
    assert hit.cached_tokens == ids.shape[1] - 1
    assert extended.cached_tokens == 3 * BLOCK + 9 - 9  # the blocks the first request published
    assert torch.equal(extended.sequences, plain_tokens(model, longer, 16))
