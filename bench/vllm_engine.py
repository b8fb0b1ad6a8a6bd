"""One vLLM engine of `kvbench vllm`, in its own process: `python -m bench.vllm_engine SPEC OUT`.

SPEC (JSON, written by ``bench.vllm_bench``) names the model, the KV connector (or none), the
role and the prompts as token ids; OUT (JSON) gets, per prompt, the wall time of each
`generate(max_tokens=1)` (time to first token), its `num_cached_tokens` and token, and the token
ids of one `max_tokens=16` run. The publisher sends each prompt once (a first, full prefill);
the reader clears vLLM's own prefix cache before each timed run, so what it does not prefill
came from the connector. The engine runs in this process (no engine-core subprocess), so
the shim below reaches the connector's code.
"""

from __future__ import annotations

import json
import sys
import time
import traceback


class _CpuEvent:
    """torch.cuda.Event on a CPU build: the forward has finished when `record` is called (CPU
    kernels are synchronous), so recording and waiting are no-ops. vLLM's MooncakeStoreConnector
    creates one per saving step (`wait_for_save`), which CPU-only torch cannot construct."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def record(self, *args, **kwargs) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def wait(self, *args, **kwargs) -> None:
        pass


def _install_cpu_event_shim() -> bool:
    import torch

    if torch.cuda.is_available():
        return False
    torch.cuda.Event = _CpuEvent
    return True


def _generate(llm, ids: list[int], max_tokens: int):
    from vllm import SamplingParams

    t0 = time.perf_counter()
    out = llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=max_tokens, temperature=0.0),
                       use_tqdm=False)[0]
    return time.perf_counter() - t0, out


def _timed(llm, ids: list[int]) -> dict:
    """TTFT (wall) and this process's CPU seconds over it (all threads): the CPU time moves
    less than the wall time when other work shares the cores."""
    cpu0 = time.process_time()
    wall, out = _generate(llm, ids, 1)
    return {"ttft_s": wall, "cpu_s": time.process_time() - cpu0, "num_cached_tokens": out.num_cached_tokens,
            "token": list(out.outputs[0].token_ids)}


def _reset(llm, spec: dict) -> bool:
    """vLLM's local prefix cache emptied. A connector's asynchronous save keeps the blocks of a
    finished request until the engine steps again and collects it: between tries a request
    shorter than a block (nothing to save or load) steps it. False (reported) if it never empties."""
    for k in range(20):
        if llm.reset_prefix_cache():
            return True
        _generate(llm, [spec["filler_token"] + k] * 4, 1)
        time.sleep(0.05 * k)
    return False


def _measure(llm, prompt: dict, spec: dict) -> dict:
    reader = spec["role"] == "reader"
    samples, spent = [], 0.0
    while len(samples) < (spec["repeats"] if reader else 1):
        reset_ok = _reset(llm, spec) if reader else None
        samples.append({**_timed(llm, prompt["ids"]), "reset_ok": reset_ok})
        spent += samples[-1]["ttft_s"]
        if spent > spec["repeat_budget_s"]:
            break
    row = {"name": prompt["name"], "length": prompt["length"], "prompt_tokens": len(prompt["ids"]),
           "samples": samples}
    if reader and spec["check_tokens"]:
        # right after the timed run: the prefix blocks it loaded are still in vLLM's cache, so
        # these tokens are computed over the KV the connector supplied
        _, out = _generate(llm, prompt["ids"], spec["check_tokens"])
        row.update(check_tokens=list(out.outputs[0].token_ids), check_cached=out.num_cached_tokens)
    return row


def _drain(llm, spec: dict) -> None:
    """Publisher: a connector may still be saving when generate returns; a few short requests
    step the engine (which collects finished saves), then the process lingers briefly."""
    for k in range(3):
        _generate(llm, [spec["filler_token"] + k] * 4, 1)
        time.sleep(spec["drain_s"] / 3)


def run(spec: dict) -> dict:
    result: dict = {"role": spec["role"], "cpu_event_shim": False}
    if spec.get("cpu_event_shim"):
        result["cpu_event_shim"] = _install_cpu_event_shim()
    t0 = time.perf_counter()
    from vllm import LLM
    from vllm.config import KVTransferConfig

    kv = KVTransferConfig(**spec["kv_transfer_config"]) if spec["kv_transfer_config"] else None
    llm = LLM(model=spec["model"], dtype=spec["dtype"], max_model_len=spec["max_model_len"],
              enable_prefix_caching=True, enforce_eager=spec["enforce_eager"], seed=0, kv_transfer_config=kv,
              max_num_batched_tokens=spec["max_num_batched_tokens"])
    result["engine_start_s"] = time.perf_counter() - t0
    result["block_size"] = llm.llm_engine.vllm_config.cache_config.block_size
    wall, out = _generate(llm, spec["warmup"]["ids"], 1)  # first-call costs, untimed
    result["warmup"] = {"ttft_s": wall, "num_cached_tokens": out.num_cached_tokens}
    result["prompts"] = []
    for k, prompt in enumerate(spec["prompts"]):
        result["prompts"].append(_measure(llm, prompt, spec))
        if spec.get("reference_prompts"):
            # the reader's question right after its document: vLLM's own prefix cache supplies the
            # document's KV exactly as this process computed it, which is what a connector loads
            _, out = _generate(llm, spec["reference_prompts"][k]["ids"], spec["check_tokens"])
            result["prompts"][-1].update(reference_tokens=list(out.outputs[0].token_ids),
                                         reference_cached=out.num_cached_tokens)
    if spec["role"] == "publisher" and kv is not None:
        _drain(llm, spec)
    return result


def main(argv: list[str]) -> int:
    spec_path, out_path = argv
    with open(spec_path) as f:
        spec = json.load(f)
    try:
        result = {"status": "measured", **run(spec)}
    except Exception as exc:  # a connector that cannot start or load is a row's status, not a crash
        result = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}",
                  "traceback": traceback.format_exc()[-4000:]}
    with open(out_path, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
