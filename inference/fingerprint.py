"""Model fingerprint: SHA-256 over a canonical JSON of everything that decides the KV bytes.

Two models that differ in architecture, KV-shaping config, cache dtype, tokenizer or weights never
share a fingerprint, so they never share a key (docs/key-spec.md, "Fingerprint").
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import weakref
from collections.abc import Iterable
from typing import Any

import torch

FINGERPRINT_VERSION = 1
# Config fields that shape the KV or the numbers in it; absent ones are recorded as null.
KV_CONFIG_FIELDS = (
    "model_type", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "hidden_size", "intermediate_size", "vocab_size", "hidden_act", "rms_norm_eps", "layer_norm_eps",
    "rope_parameters", "rope_theta", "rope_scaling", "partial_rotary_factor", "max_position_embeddings",
    "sliding_window", "use_sliding_window", "max_window_layers", "layer_types", "attention_bias",
    "attention_chunk_size", "attn_logit_softcapping", "query_pre_attn_scalar", "tie_word_embeddings",
)
_CHUNK = 64 << 20

_lock = threading.Lock()
_model_digests: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (stamp, digest)
_file_digests: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256 hex


def fingerprint(model: torch.nn.Module, tokenizer: Any = None) -> str:
    """Hex SHA-256 of the model's identity for KV reuse; cheap after the first call per model."""
    return hashlib.sha256(canonical_json(model_identity(model, tokenizer))).hexdigest()


def model_identity(model: torch.nn.Module, tokenizer: Any = None) -> dict[str, Any]:
    return {
        "fingerprint_version": FINGERPRINT_VERSION,
        "architecture": type(model).__name__,
        "config": config_fields(model.config.get_text_config(decoder=True)),
        "cache_dtype": str(model.dtype).removeprefix("torch."),
        "tokenizer": tokenizer_digest(tokenizer),
        "weights": weights_digest(model),
    }


def config_fields(config: Any) -> dict[str, Any]:
    """The identity's `config` object: the KV-shaping fields of a (text) config, null when absent."""
    fields = {name: _jsonable(getattr(config, name, None)) for name in KV_CONFIG_FIELDS}
    fields["head_dim"] = fields["head_dim"] or config.hidden_size // config.num_attention_heads
    fields["num_key_value_heads"] = fields["num_key_value_heads"] or config.num_attention_heads
    return fields


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def tokenizer_digest(tokenizer: Any) -> str | None:
    """SHA-256 of the tokenizer's full definition (vocab, merges, special and added tokens)."""
    if tokenizer is None:
        return None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        text = backend.to_str()
    else:  # a slow tokenizer: its vocabulary and special tokens are what map text to ids
        text = canonical_json(
            {
                "vocab": sorted(tokenizer.get_vocab().items()),
                "special": _jsonable(getattr(tokenizer, "special_tokens_map", {})),
                "class": type(tokenizer).__name__,
            }
        ).decode()
    return hashlib.sha256(text.encode()).hexdigest()


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of the weights, memoised per model until a tensor changes (storage, version, dtype).

    A model loaded by inference.models.load_model from safetensors files is identified by the
    files (digest cached on path + size + mtime) as long as its tensors are the ones loaded.
    """
    stamp = _state_stamp(model)
    with _lock:
        cached = _model_digests.get(model)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    source = getattr(model, "_kv_weight_files", None)
    if source is not None and source[0] == stamp:
        digest = "files:" + files_digest(source[1])
    else:
        digest = "tensors:" + tensors_digest(model.state_dict().items())
    with _lock:
        _model_digests[model] = (stamp, digest)
    return digest


def remember_weight_files(model: torch.nn.Module, paths: Iterable[str]) -> None:
    """Record that `model`'s tensors, as they are now, were loaded from these files."""
    model._kv_weight_files = (_state_stamp(model), sorted(os.path.realpath(p) for p in paths))


def tensors_digest(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(named_tensors, key=lambda item: item[0]):
        if tensor.device.type == "meta":
            raise ValueError(f"cannot fingerprint {name}: it is on the meta device (no weights)")
        h.update(canonical_json([name, str(tensor.dtype), list(tensor.shape)]))
        flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        for start in range(0, flat.numel(), _CHUNK):
            h.update(flat[start : start + _CHUNK].cpu().numpy())
    return h.hexdigest()


def files_digest(paths: Iterable[str]) -> str:
    h = hashlib.sha256()
    for path in sorted(paths):
        h.update(canonical_json([os.path.basename(path), _file_digest(path)]))
    return h.hexdigest()


def _file_digest(path: str) -> str:
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    with _lock:
        if key in _file_digests:
            return _file_digests[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    with _lock:
        _file_digests[key] = h.hexdigest()
    return _file_digests[key]


def _state_stamp(model: torch.nn.Module) -> tuple:
    """Changes whenever a tensor is replaced, moved, cast or modified in place."""
    return tuple(
        (name, t.data_ptr() if t.device.type != "meta" else 0, t._version, str(t.dtype), str(t.device))
        for name, t in model.state_dict().items()
    )


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return repr(value)  # exact and NaN-safe
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value)
