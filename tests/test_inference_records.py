"""Records that cannot be trusted are misses with a reason; the codec is lossless; fingerprints separate models."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.generation.streamers import BaseStreamer

from inference import CachedGenerator, fingerprint
from inference.blocks import export_segment
from inference.codec import HEADER_SIZE, RecordError, decode_into, encode, parse_header
from inference.models import load_model
from kvproto.errors import Unavailable
from kvproto.keys import record_key
from tests.conftest_models import BLOCK, local_store, plain_tokens, prompt, tiny  # noqa: F401  (fixture)

fingerprint_module = importlib.import_module("inference.fingerprint")  # the package exports the function
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- the codec ---------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    codec=st.sampled_from(["none", "zstd-byteplane"]),
    heads=st.integers(1, 4), tokens=st.integers(1, 9), head_dim=st.integers(1, 16), seed=st.integers(0, 2**16),
)
def test_codec_roundtrip_is_lossless(dtype, codec, heads, tokens, head_dim, seed) -> None:
    g = torch.Generator().manual_seed(seed)
    k = (torch.randn(heads, tokens, head_dim, generator=g) * 10).to(dtype)
    v = (torch.randn(heads, tokens, head_dim, generator=g) * 10).to(dtype)
    record = encode(k, v, layer=3, codec=codec)
    header = parse_header(record)
    assert (header.layer, header.shape, header.dtype) == (3, (2, heads, tokens, head_dim), dtype)
    dest = torch.zeros(2, 1, heads, tokens + 4, head_dim, dtype=dtype)
    decode_into(record, dest[:, 0, :, 2 : 2 + tokens])
    assert torch.equal(dest[0, 0, :, 2 : 2 + tokens].view(torch.uint8), k.view(torch.uint8))
    assert torch.equal(dest[1, 0, :, 2 : 2 + tokens].view(torch.uint8), v.view(torch.uint8))
    assert not dest[:, :, :, :2].any() and not dest[:, :, :, 2 + tokens :].any()


def _record(codec: str = "none") -> bytes:
    return encode(torch.randn(2, 3, 4), torch.randn(2, 3, 4), layer=0, codec=codec)


@pytest.mark.parametrize("codec", ["none", "zstd-byteplane"])
def test_codec_detects_damage(codec: str) -> None:
    """Structure only: flipped data bytes are the store record's digest to catch (test below)."""
    record = bytearray(_record(codec))
    dest = torch.empty(2, 2, 3, 4)
    for damaged, reason in [(b"XXXX" + bytes(record[4:]), "bad_header"), (bytes(record[:-3]), "corrupt"),
                            (bytes(record[:10]), "bad_header")]:
        with pytest.raises(RecordError) as err:
            decode_into(damaged, dest)
        assert err.value.reason == reason
    with pytest.raises(RecordError) as err:
        decode_into(_record(codec), torch.empty(2, 2, 3, 4, dtype=torch.bfloat16))
    assert err.value.reason == "dtype_mismatch"
    with pytest.raises(RecordError) as err:
        decode_into(_record(codec), torch.empty(2, 2, 2, 4))
    assert err.value.reason == "shape_mismatch"


def test_header_is_fixed_and_little_endian() -> None:
    record = encode(torch.ones(1, 2, 4, dtype=torch.bfloat16), torch.ones(1, 2, 4, dtype=torch.bfloat16), layer=258)
    assert HEADER_SIZE == 64 and record[:4] == b"KVB1"
    assert record[4:12] == bytes([2, 0, 64, 0, 3, 0, 2, 1])  # version, header size, bf16, codec none, layer 258
    assert record[12:28] == bytes([2, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 4, 0, 0, 0])
    assert record[HEADER_SIZE:HEADER_SIZE + 2] == bytes([0x80, 0x3F])  # bf16 1.0, raw little-endian


# ---- unusable records are misses with a reason ---------------------------------------------------
def _tamper(items: list[tuple[bytes, bytes]], case: str, layout) -> list[tuple[bytes, bytes]]:
    key0, rec0 = items[0]
    if case == "corrupt":  # damaged where it is stored, below (a digest made of damaged bytes passes)
        return items
    if case == "missing_layer":
        return items[:1]
    if case == "bad_header":
        return [(key0, b"not a KV record at all, but long enough to look like one" * 2), *items[1:]]
    if case == "layer_mismatch":
        return [(items[0][0], items[1][1]), (items[1][0], items[0][1])]
    t = torch.zeros(layout.kv_heads, BLOCK, layout.head_dim)
    if case == "dtype_mismatch":
        return [(k, encode(t.to(torch.bfloat16), t.to(torch.bfloat16), i)) for i, (k, _) in enumerate(items)]
    if case == "shape_mismatch":
        return [(k, encode(t[:, :-1], t[:, :-1], i)) for i, (k, _) in enumerate(items)]
    raise AssertionError(case)


class Collect(BaseStreamer):
    def __init__(self) -> None:
        self.puts: list[torch.Tensor] = []

    def put(self, value) -> None:
        self.puts.append(value.clone())

    def end(self) -> None:
        pass


@pytest.mark.parametrize("pipelined", [False, True], ids=["sync", "pipelined"])
@pytest.mark.parametrize(
    "case", ["corrupt", "missing_layer", "bad_header", "layer_mismatch", "dtype_mismatch", "shape_mismatch"]
)
def test_unusable_block_is_a_counted_miss(case: str, pipelined: bool, local_store) -> None:
    """Pipelined: the forward has started on the whole prefix when the bad record turns up; it
    is run again on the usable prefix, and the streamer still sees the prompt once."""
    model = tiny("tiny-qwen3")
    ids = prompt(3 * BLOCK + 2, seed=11)
    gen = CachedGenerator(model, local_store, block_size=BLOCK, publish=False, pipeline_loads=pipelined)
    with torch.inference_mode():
        fresh = model(ids, use_cache=True).past_key_values
    (key0, s0, n0), (key1, s1, n1) = gen.plan(ids[0].tolist()).segments()[:2]
    local_store.put_many(export_segment(fresh, key0, s0, n0))
    second = _tamper(export_segment(fresh, key1, s1, n1), case, gen.layout)
    local_store.put_many(second)
    if case == "corrupt":
        storage = local_store.storage
        with storage.env.begin(db=storage.data_db, write=True) as txn:
            damaged = bytearray(txn.get(second[1][0]))
            damaged[-HEADER_SIZE] ^= 0x01  # one bit of K/V data of layer 1
            txn.put(second[1][0], bytes(damaged))
    streamer = Collect()
    result = gen.generate(ids, 24, do_sample=False, streamer=streamer)
    assert result.cached_tokens == BLOCK
    assert result.miss_reasons == {case: 1}
    assert gen.stats[f"miss_{case}"] == 1
    assert gen.stats["load_reruns"] == int(pipelined)
    assert torch.equal(result.sequences, plain_tokens(model, ids))
    assert torch.equal(streamer.puts[0].view(-1), ids.view(-1))
    assert torch.equal(torch.cat([p.view(-1) for p in streamer.puts[1:]]), result.new_tokens)


class FailingStore:
    """A real store that fails the way a cluster can (node down) on chosen calls."""

    def __init__(self, inner, failing: set[str]) -> None:
        self.inner, self.failing = inner, failing

    def __getattr__(self, name):
        if name in self.failing:
            def fail(*args, **kwargs):
                raise Unavailable("node down")
            return fail
        return getattr(self.inner, name)


@pytest.mark.parametrize("pipelined", [False, True], ids=["sync", "pipelined"])
@pytest.mark.parametrize("failing", [{"exists"}, {"get_many", "read_into"}, {"put_many"}])
def test_store_failures_cost_a_miss_never_an_answer(failing: set[str], pipelined: bool, local_store) -> None:
    model = tiny("tiny-llama")
    ids = prompt(2 * BLOCK + 5, seed=12)
    with CachedGenerator(model, local_store, block_size=BLOCK) as warm:
        warm.generate(ids, 2, do_sample=False)
    with CachedGenerator(model, FailingStore(local_store, failing), block_size=BLOCK, pipeline_loads=pipelined) as gen:
        result = gen.generate(ids, 24, do_sample=False)
        gen.flush()
    assert torch.equal(result.sequences, plain_tokens(model, ids))
    if failing & {"exists", "read_into"}:
        assert result.cached_tokens == 0 and result.miss_reasons == {"store_error": 1}
        # the write-behind writes what the lookup did not find (without asking again): it goes
        # through, or the store's outage is counted
        assert gen.stats["publish_errors"] == int("put_many" in failing)
    else:
        assert result.cached_tokens == ids.shape[1] - 1


def test_failed_publish_is_counted(local_store) -> None:
    with CachedGenerator(tiny("tiny-qwen3"), FailingStore(local_store, {"put_many"}), block_size=BLOCK) as gen:
        result = gen.generate(prompt(BLOCK + 3, seed=13), 2, do_sample=False)
        gen.flush()
    assert result.published is not None and gen.stats["publish_errors"] == 1
    assert not local_store.exists([record_key(gen.plan(prompt(BLOCK + 3, seed=13)[0].tolist()).block_keys[0], 0)])[0]


# ---- fingerprints ------------------------------------------------------------------------------
def test_fingerprint_separates_weights_dtype_and_architecture() -> None:
    prints = {
        fingerprint(tiny("tiny-qwen3")),
        fingerprint(tiny("tiny-qwen3", seed=1)),
        fingerprint(tiny("tiny-qwen3", torch.bfloat16)),
        fingerprint(tiny("tiny-llama")),
    }
    assert len(prints) == 4 and all(len(p) == 64 for p in prints)
    fresh, _ = load_model("tiny-qwen3")
    assert fingerprint(fresh) == fingerprint(tiny("tiny-qwen3"))  # same seed, same weights


def test_fingerprint_separates_tokenizers() -> None:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    def tokenizer(words: list[str]):
        vocab = {w: i for i, w in enumerate(["[UNK]", *words])}
        return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="[UNK]")))

    model = tiny("tiny-qwen3")
    a, b = tokenizer(["kv", "cache"]), tokenizer(["cache", "kv"])
    assert len({fingerprint(model), fingerprint(model, a), fingerprint(model, b)}) == 3
    assert fingerprint(model, a) == fingerprint(model, tokenizer(["kv", "cache"]))


def test_fingerprint_is_memoised_until_weights_change(monkeypatch) -> None:
    model, _ = load_model("tiny-llama", seed=5)
    calls = []
    real = fingerprint_module.tensors_digest
    monkeypatch.setattr(fingerprint_module, "tensors_digest", lambda items: calls.append(1) or real(items))
    first = fingerprint(model)
    assert fingerprint(model) == first and len(calls) == 1
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.weight[0, 0] += 1.0  # in place: same storage, new version
    assert fingerprint(model) != first and len(calls) == 2
    model.to(torch.bfloat16)
    assert fingerprint(model) not in (first,) and len(calls) == 3


def test_fingerprint_of_saved_model_uses_its_files(tmp_path) -> None:
    model, _ = load_model("tiny-qwen3", seed=3)
    model.save_pretrained(tmp_path / "m")
    loaded, tokenizer = load_model(str(tmp_path / "m"))
    assert tokenizer is None
    identity = fingerprint_module.model_identity(loaded)
    assert identity["weights"].startswith("files:")
    assert fingerprint(loaded) == fingerprint(load_model(str(tmp_path / "m"))[0])
    with torch.no_grad():
        loaded.lm_head.weight.mul_(2)  # no longer what the files hold
    assert fingerprint_module.model_identity(loaded)["weights"].startswith("tensors:")


def test_fingerprint_is_the_same_in_another_process() -> None:
    code = "from inference.models import load_model; from inference import fingerprint; " \
           "print(fingerprint(load_model('tiny-qwen3')[0]))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == fingerprint(tiny("tiny-qwen3"))
