"""Real KV for `kvbench compress`, and the empirical entropy of its fields under several models.

`model_kv(name, tokens)` runs one prefill of the bundled document (repeated to `tokens`) and
returns K and V as [layers, kv_heads, tokens, head_dim]. `entropy_bits(part, dtype)` gives, for
one record part [kv_heads, tokens, head_dim], the bits a coder of each model family needs at best
(empirical entropy with the tables free; `adaptive` rows charge the cost of learning them).
"""

from __future__ import annotations

import numpy as np
import torch

from inference.demo import DOCUMENT_PATH
from inference.kvcodec import SIGN_EXP_BITS, UINT
from inference.models import encode_prompt, load_model

MODELS = ("smollm2", "tiny-qwen3", "tiny-llama")
# name -> what it stands for; each is the best a coder of that family reaches on a record
BOUNDS = {
    "order-0 byte planes": "one table per byte plane (zstd-byteplane's family)",
    "order-0 exponent, rest raw": "exponent byte entropy-coded, sign and mantissa stored (zipnn's family)",
    "order-0 top field + low planes": "sign+exponent+1 mantissa bit per record, low bits per plane (zstd-grouped, token-major)",
    "per-channel top field + low planes": "a table per channel (zstd-grouped with one group per channel, tables free)",
    "per-channel top field, adaptive": "the same, charging an adaptive (KT) coder's cost of learning each channel's table",
    "per-channel + previous token, adaptive": "top field given its channel and the previous token's top field (KT)",
}


@torch.no_grad()
def model_kv(name: str, tokens: int, dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
    """K, V [layers, kv_heads, tokens, head_dim] of one prefill of the demo document (ModelUnavailable
    if the model is not installed)."""
    model, tokenizer = load_model(name, dtype=dtype)
    with open(DOCUMENT_PATH, encoding="utf-8") as f:
        ids = encode_prompt(tokenizer, f.read(), model.config.vocab_size, chat=False)
    ids = ids.repeat(1, -(-tokens // ids.shape[1]))[:, :tokens]
    cache = model(ids, use_cache=True).past_key_values
    keys = torch.stack([layer.keys[0] for layer in cache.layers])
    values = torch.stack([layer.values[0] for layer in cache.layers])
    return keys.contiguous(), values.contiguous()


def records(keys: torch.Tensor, values: torch.Tensor, record_tokens: int) -> list[torch.Tensor]:
    """The [2, kv_heads, tokens, head_dim] records a store keeps: one per layer and block."""
    total = keys.shape[2]
    return [torch.stack([keys[layer, :, a : a + record_tokens], values[layer, :, a : a + record_tokens]]).contiguous()
            for layer in range(keys.shape[0]) for a in range(0, total, record_tokens)]


def _entropy(counts: np.ndarray) -> float:
    """Total bits of coding `counts` (flat) with their own frequencies."""
    c = counts[counts > 0].astype(np.float64)
    return float(-(c * np.log2(c / c.sum())).sum())


def _conditional(symbols: np.ndarray, context: np.ndarray) -> float:
    """Bits of coding `symbols` with one table per context value (tables free)."""
    joint = np.unique(context.astype(np.int64) * (int(symbols.max()) + 1) + symbols, return_counts=True)[1]
    contexts = np.unique(context, return_counts=True)[1]
    return _entropy(joint) - _entropy(contexts)


def _adaptive(symbols: np.ndarray, context: np.ndarray) -> float:
    """Bits of an adaptive Krichevsky-Trofimov coder with one model per context over the record's
    alphabet: the empirical entropy plus the price of learning each table."""
    alphabet, sym = np.unique(symbols, return_inverse=True)
    ctx = np.unique(context, return_inverse=True)[1]
    a = len(alphabet)
    joint = torch.from_numpy(np.bincount(ctx.ravel().astype(np.int64) * a + sym.ravel(),
                                         minlength=(int(ctx.max()) + 1) * a).reshape(-1, a).astype(np.float64))
    n = joint.sum(1)
    nats = (torch.lgamma(n + a / 2) - torch.lgamma(torch.tensor(a / 2.0))).sum() \
        - (torch.lgamma(joint + 0.5) - torch.lgamma(torch.tensor(0.5))).sum()
    return float(nats / np.log(2))


def entropy_bits(part: torch.Tensor) -> dict[str, float]:
    """Bits to code one part [kv_heads, tokens, head_dim] under each model in BOUNDS."""
    itemsize = part.element_size()
    bits, sign_exp = 8 * itemsize, SIGN_EXP_BITS[part.dtype]
    u = part.contiguous().view(torch.int16 if itemsize == 2 else torch.int32).numpy().view(UINT[itemsize]).astype(np.int64)
    heads, tokens, head_dim = u.shape
    low_bits = bits - sign_exp - 1
    top, low = u >> low_bits, u & ((1 << low_bits) - 1)
    low_planes = sum(_entropy(np.bincount(((low >> (8 * i)) & 0xFF).ravel())) for i in range((low_bits + 7) // 8))
    exponent = (u >> (bits - sign_exp)) & ((1 << (sign_exp - 1)) - 1)
    channel = np.broadcast_to(np.arange(heads)[:, None, None] * head_dim + np.arange(head_dim), u.shape)
    previous = np.concatenate([np.full_like(top[:, :1], -1), top[:, :-1]], axis=1) + 1
    return {
        "order-0 byte planes": sum(_entropy(np.bincount(((u >> (8 * i)) & 0xFF).ravel())) for i in range(itemsize)),
        "order-0 exponent, rest raw": _entropy(np.bincount(exponent.ravel())) + (bits - sign_exp + 1) * u.size,
        "order-0 top field + low planes": _entropy(np.bincount(top.ravel())) + low_planes,
        "per-channel top field + low planes": _conditional(top, channel) + low_planes,
        "per-channel top field, adaptive": _adaptive(top, channel) + low_planes,
        "per-channel + previous token, adaptive": _adaptive(top, channel * (int(top.max()) + 2) + previous) + low_planes,
    }
