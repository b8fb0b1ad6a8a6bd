"""The CUDA side of the fast path (pinned staging, side-stream copies, pipelined layers).

Skipped without a GPU: run `pytest tests/test_cuda.py` on a machine that has one.
"""

from __future__ import annotations

import pytest
import torch

from inference import CachedGenerator
from inference.blocks import export_segment
from inference.loader import load_prefix
from inference.models import load_model
from tests.conftest_models import BLOCK, colocated_store, prompt  # noqa: F401  (fixture)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _model(dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    model, _ = load_model("tiny-qwen3", dtype=dtype, device="cuda")
    return model


@pytest.mark.parametrize("background", [False, True])
def test_cuda_load_equals_fresh_prefill(background, colocated_store) -> None:
    model = _model()
    gen = CachedGenerator(model, colocated_store, block_size=BLOCK, publish=False)
    ids = prompt(4 * BLOCK + 3, seed=31).cuda()
    with torch.inference_mode():
        fresh = model(ids, use_cache=True).past_key_values
    plan = gen.plan(ids[0].tolist())
    for key, start, count in plan.segments():
        colocated_store.put_many(export_segment(fresh, key, start, count))
    loaded = load_prefix(colocated_store, plan, gen.layout, background=background)
    for layer in loaded.cache.layers:
        layer.wait_ready()
    loaded = loaded.settle()
    torch.cuda.synchronize()
    assert loaded.tokens == ids.shape[1] and loaded.reasons == {}
    for mine, theirs in zip(loaded.cache.layers, fresh.layers):
        assert torch.equal(mine.keys, theirs.keys) and torch.equal(mine.values, theirs.values)


@pytest.mark.parametrize("pipelined", [False, True])
def test_cuda_reuse_generates_the_plain_tokens(pipelined, colocated_store) -> None:
    model = _model()
    ids = prompt(5 * BLOCK + 1, seed=32).cuda()
    with torch.inference_mode():
        plain = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
    with CachedGenerator(model, colocated_store, block_size=BLOCK) as gen:
        gen.generate(ids, 2, do_sample=False)
        gen.flush()
    with CachedGenerator(model, colocated_store, block_size=BLOCK, publish=False, pipeline_loads=pipelined) as gen:
        for _ in range(2):  # the second request reuses the pooled device buffers
            hit = gen.generate(ids, 16, do_sample=False)
            assert hit.cached_tokens == ids.shape[1] - 1 and torch.equal(hit.sequences, plain)
    assert gen.arena.reused >= 1
