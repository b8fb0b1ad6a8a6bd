"""A vLLM engine in its own process, driven one JSON command per line (tests, demo, benchmarks).

    python -m inference.vllm.run --model DIR [--dtype bfloat16] [--kv-transfer-config JSON]

Prints ``READY {...}`` once the engine is up, then answers each command line on stdin with one
``RESULT {...}`` line. A command: ``{"prompts": [[token ids], ...], "max_tokens": 16,
"cache_salt": "..."}`` (``{"quit": true}`` ends it). A result: per prompt the generated token ids,
text and ``num_cached_tokens``; the wall seconds of the call; the connector's counters so far
(``vllm:kvstore_*`` from ``LLM.get_metrics()``). ``{"identity": true}`` answers the connector's
fingerprint and the model's layer count (what a publisher names its stored blocks by:
``inference.vllm.listings.publish_stored``). ``Engine`` is the parent's handle.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV_DEFAULTS = {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "TOKENIZERS_PARALLELISM": "false"}


def kvstore_metrics(llm: Any) -> dict[str, float]:
    out: dict[str, float] = {}
    for metric in llm.get_metrics():
        if not metric.name.startswith("vllm:kvstore_"):
            continue
        name = metric.name.removeprefix("vllm:kvstore_")
        reason = metric.labels.get("reason")
        key = f"{name}:{reason}" if reason else name
        out[key] = out.get(key, 0) + float(getattr(metric, "value", 0) or 0)
    return out


def identity(llm: Any, kv_transfer_config: dict) -> dict[str, Any]:
    """The connector's fingerprint (computed as its scheduler does, or the configured one) and layers."""
    from .config import vllm_fingerprint

    config = llm.llm_engine.vllm_config
    extra = kv_transfer_config.get("kv_connector_extra_config") or {}
    return {"fingerprint": extra.get("fingerprint") or vllm_fingerprint(config),
            "layers": config.model_config.get_num_layers(config.parallel_config)}


def serve(args: argparse.Namespace) -> int:
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    started = time.perf_counter()
    kwargs: dict[str, Any] = {}
    if args.kv_transfer_config:
        kwargs["kv_transfer_config"] = KVTransferConfig(**json.loads(args.kv_transfer_config))
    llm = LLM(model=args.model, dtype=args.dtype, max_model_len=args.max_model_len, enforce_eager=True,
              disable_log_stats=False, seed=0, enable_prefix_caching=not args.no_prefix_caching, **kwargs)
    print("READY", json.dumps({"seconds": time.perf_counter() - started}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        cmd = json.loads(line)
        if cmd.get("quit"):
            break
        if cmd.get("identity"):
            print("RESULT", json.dumps(identity(llm, json.loads(args.kv_transfer_config or "{}"))), flush=True)
            continue
        salt = cmd.get("cache_salt")
        prompts = [{"prompt_token_ids": ids, **({"cache_salt": salt} if salt else {})} for ids in cmd["prompts"]]
        params = SamplingParams(max_tokens=cmd.get("max_tokens", 16), temperature=0.0)
        t0 = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - t0
        result = {
            "outputs": [{"token_ids": list(o.outputs[0].token_ids), "text": o.outputs[0].text,
                         "num_cached_tokens": o.num_cached_tokens or 0} for o in outputs],
            "seconds": seconds,
            "metrics": kvstore_metrics(llm),
        }
        print("RESULT", json.dumps(result), flush=True)
    del llm
    return 0


class Engine:
    """`with Engine(model_dir, kv_transfer_config=...) as e: e.generate([[1, 2, 3]])`."""

    def __init__(self, model: str, dtype: str = "bfloat16", kv_transfer_config: dict | None = None,
                 max_model_len: int = 4096, prefix_caching: bool = True, env: dict[str, str] | None = None,
                 start_timeout: float = 600) -> None:
        argv = [sys.executable, "-m", "inference.vllm.run", "--model", model, "--dtype", dtype,
                "--max-model-len", str(max_model_len)] + ([] if prefix_caching else ["--no-prefix-caching"])
        if kv_transfer_config is not None:
            argv += ["--kv-transfer-config", json.dumps(kv_transfer_config)]
        full_env = {**ENV_DEFAULTS, **os.environ, **(env or {})}
        full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))
        # the engine's own log goes to $KV_VLLM_LOG when set (it is long), else nowhere
        self.log = open(os.environ.get("KV_VLLM_LOG") or os.devnull, "a")
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, env=full_env)
        self.ready = self._read("READY", start_timeout)

    def _read(self, tag: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"vLLM engine exited (code {self.proc.wait()}) before {tag}")
            if line.startswith(tag + " "):
                return json.loads(line[len(tag) + 1 :])
            self.log.write(line)
        raise TimeoutError(f"vLLM engine gave no {tag} in {timeout:.0f} s")

    def generate(self, prompts: list[list[int]], max_tokens: int = 16, cache_salt: str | None = None,
                 timeout: float = 600) -> dict:
        self.proc.stdin.write(json.dumps({"prompts": prompts, "max_tokens": max_tokens, "cache_salt": cache_salt})
                              + "\n")
        self.proc.stdin.flush()
        return self._read("RESULT", timeout)

    def identity(self, timeout: float = 120) -> dict:
        """{"fingerprint", "layers"} of the engine's connector."""
        self.proc.stdin.write(json.dumps({"identity": True}) + "\n")
        self.proc.stdin.flush()
        return self._read("RESULT", timeout)

    def close(self, timeout: float = 120) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"quit": True}) + "\n")
                self.proc.stdin.close()
                self.proc.wait(timeout)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m inference.vllm.run", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--kv-transfer-config", default=None, help="JSON of vLLM's KVTransferConfig")
    parser.add_argument("--no-prefix-caching", action="store_true", help="turn vLLM's own prefix cache off")
    return serve(parser.parse_args(argv))


if __name__ == "__main__":
    for _key, _value in ENV_DEFAULTS.items():
        os.environ.setdefault(_key, _value)
    sys.exit(main())
