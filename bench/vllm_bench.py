"""Scenario `vllm`: time to first token and prompt throughput inside vLLM, with no KV connector,
with this store's connector (co-located and over gRPC), vLLM's ExampleConnector and Mooncake
Store's connector; same run, same prompts (token ids), SmolLM2-135M in bfloat16.

Per configuration, two fresh engine processes (``bench.vllm_engine``): the publisher prefills
one document of each length (plus a first question); the reader asks a new question over each
document (the same document tokens, another suffix). The reader has an empty local prefix
cache, so only an external store can supply the document: its TTFT is the reuse case.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from kvstore.process import stop_process

from .report import Report
from .servers import PYTHON, REPO_ROOT, ServerProcess, subprocess_env
from .vllm_report import CONFIGS, OURS, WARMUP_TOKENS, notes, plot, ratios, summarize, table, versions

QUESTIONS = ("\n\nQuestion: Summarize the document above in one sentence.\nAnswer:",  # publisher
             "\n\nQuestion: Which numbers does the document above mention, and what do they measure?\nAnswer:")


@dataclass(frozen=True)
class VllmParams:
    lengths: tuple[int, ...] = (1024, 4096, 7936)  # 7936 = 62 blocks of 128: the 8k doc + question fit 8192
    repeats: int = 5  # reader runs per question, median; fewer once a prompt has taken repeat_budget_s
    repeat_budget_s: float = 12.0
    configs: tuple[str, ...] = CONFIGS
    dtype: str = "bfloat16"
    max_model_len: int = 8192  # SmolLM2's max_position_embeddings
    # one prefill step per prompt: ExampleConnector saves a 4096-token chunk of a chunked prefill
    # under the whole prompt's key (its reader then fails on a shape mismatch)
    max_num_batched_tokens: int = 8192
    kvcache_gib: float = 2.0  # VLLM_CPU_KVCACHE_SPACE
    threads: int = 1  # OMP_NUM_THREADS: unset, an engine computes on 2 threads when the box is idle, 1 when not
    enforce_eager: bool = True  # CPU torch.compile adds ~60-80 s to every engine start here
    check_tokens: int = 16
    engine_timeout_s: float = 600.0
    machine_note: str = ""


class ConfigUnavailable(Exception):
    """A configuration cannot run here (its connector or server is missing): the row says why."""


def build_prompts(model_dir: str, lengths: tuple[int, ...]) -> dict:
    """Deterministic token ids: `inference/data/document.txt`, its paragraphs rotated per
    document under a numbered heading (no two documents share a first block), cut to length."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    paragraphs = (REPO_ROOT / "inference" / "data" / "document.txt").read_text().split("\n\n")
    encode = lambda text: tok.encode(text, add_special_tokens=False).ids  # noqa: E731

    def document(k: int, n: int) -> list[int]:
        ids: list[int] = encode(f"Document {k} of the plant archive ({n} tokens).\n\n")
        turn = 0
        while len(ids) < n:
            rot = paragraphs[(k + turn) % len(paragraphs):] + paragraphs[:(k + turn) % len(paragraphs)]
            ids += encode("\n\n".join(rot) + "\n\n")
            turn += 1
        return ids[:n]

    questions = [encode(q) for q in QUESTIONS]
    docs = {n: document(k + 1, n) for k, n in enumerate(lengths)}
    warm = document(0, min(WARMUP_TOKENS, min(lengths)))
    return {role: {"warmup": {"ids": warm + q}, "prompts": [
        {"name": f"{n}-token document + question {j + 1}", "length": n, "ids": docs[n] + q} for n in lengths]}
        for j, (role, q) in enumerate(zip(("publisher", "reader"), questions))}


def _kvstore(colocated: bool, stack: contextlib.ExitStack) -> dict:
    if not (REPO_ROOT / "inference" / "vllm" / "connector.py").exists():
        raise ConfigUnavailable("inference/vllm/connector.py does not exist (the connector is not written yet)")
    from inference.embedded import EmbeddedCluster

    cluster = EmbeddedCluster(nodes=1, replication=1)
    stack.enter_context(cluster)
    return {"kv_transfer_config": {
        "kv_connector": "KVStoreConnector", "kv_connector_module_path": "inference.vllm.connector",
        "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"nodes": cluster.addresses, "replication": 1, "colocated": colocated}},
        "facts": {"nodes": cluster.addresses}}


def _mooncake(workdir: Path, stack: contextlib.ExitStack) -> dict:
    """mooncake_master (its HTTP metadata server on) and a holder process that mounts the memory
    segment (as `kvbench peers` runs them), so the segment outlives the publisher; the engines
    mount none ("standalone-store": they put into and read from the holder's segment over TCP)."""
    from .peer_clients import MOONCAKE_ENV, PeerUnavailable, _spawn, free_port, wait_listening

    try:
        import mooncake
        import mooncake.store  # noqa: F401
    except (ImportError, OSError) as exc:
        raise ConfigUnavailable(f"mooncake-transfer-engine-non-cuda not importable ({exc})") from None
    rpc, http, metrics = free_port(), free_port(), free_port()
    argv = [str(Path(mooncake.__file__).parent / "mooncake_master"), "--enable_http_metadata_server=true",
            "--http_metadata_server_host=127.0.0.1", f"--http_metadata_server_port={http}",
            "--rpc_address=127.0.0.1", f"--rpc_port={rpc}", f"--metrics_port={metrics}", "--logtostderr"]
    try:
        master = _spawn(stack, argv, workdir / "mooncake_master.log")
        wait_listening(rpc, master, "mooncake_master")
        wait_listening(http, master, "mooncake_master's HTTP metadata server")
        metadata, master_addr = f"http://127.0.0.1:{http}/metadata", f"127.0.0.1:{rpc}"
        stack.enter_context(ServerProcess([PYTHON, "-m", "bench.peer_clients", "mooncake-holder", "--master",
                                           master_addr, "--metadata", metadata, "--segment-bytes", str(2 << 30)]))
    except (PeerUnavailable, RuntimeError, TimeoutError, OSError) as exc:
        raise ConfigUnavailable(f"Mooncake Store did not start: {exc}") from None
    config = workdir / "mooncake.json"
    config.write_text(json.dumps({"metadata_server": metadata, "master_server_address": master_addr,
                                  "protocol": "tcp", "device_name": "", "mode": "standalone-store",
                                  "global_segment_size": 0, "local_buffer_size": 256 << 20}))
    return {"kv_transfer_config": {"kv_connector": "MooncakeStoreConnector", "kv_role": "kv_both",
                                   "kv_connector_extra_config": {}},
            "env": {**MOONCAKE_ENV, "MOONCAKE_CONFIG_PATH": str(config),
                    "MOONCAKE_REQUESTER_LOCAL_HOSTNAME": "127.0.0.1"},
            "cpu_event_shim": True, "facts": {"master": master_addr, "segment_bytes": 2 << 30}}


def backend(config: str, workdir: Path, stack: contextlib.ExitStack) -> dict:
    """The connector settings of one configuration, its servers started on `stack`."""
    if config == "none":
        return {"kv_transfer_config": None}
    if config in OURS:
        return _kvstore(config == "kvstore-colocated", stack)
    if config == "example":
        (path := workdir / "example-connector").mkdir()
        return {"kv_transfer_config": {"kv_connector": "ExampleConnector", "kv_role": "kv_both",
                                       "kv_connector_extra_config": {"shared_storage_path": str(path)}}}
    if config == "mooncake":
        return _mooncake(workdir, stack)
    raise ValueError(f"unknown configuration {config!r}")


def run_engine(spec: dict, env: dict, workdir: Path, name: str, timeout: float) -> dict:
    """One engine process; its result JSON, or a failure with the tail of its log."""
    spec_path, out_path, log_path = (workdir / f"{name}.{ext}" for ext in ("spec.json", "out.json", "log"))
    spec_path.write_text(json.dumps(spec))
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([PYTHON, "-m", "bench.vllm_engine", str(spec_path), str(out_path)], cwd=REPO_ROOT,
                                env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_process(proc)
            rc = None
    if rc == 0 and out_path.exists():
        return json.loads(out_path.read_text())
    tail = log_path.read_text(errors="replace").strip().splitlines()[-6:]
    why = f"timed out after {timeout:.0f} s" if rc is None else f"exit status {rc}"
    return {"status": "failed", "reason": f"engine {why}: " + " | ".join(tail)[-1500:]}


def measure_config(config: str, prompts: dict, model_dir: str, p: VllmParams) -> dict:
    entry: dict = {"config": config, "status": "measured", "reason": None, "loadavg_before": os.getloadavg()}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"kvbench-vllm-{config}-") as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        try:
            be = backend(config, workdir, stack)
        except ConfigUnavailable as exc:
            return {**entry, "status": "failed", "reason": str(exc)}
        entry.update(kv_transfer_config=be["kv_transfer_config"], facts=be.get("facts", {}))
        env = {**subprocess_env(), "VLLM_CPU_KVCACHE_SPACE": f"{p.kvcache_gib:g}",
               "VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": str(p.threads),
               "VLLM_ENABLE_V1_MULTIPROCESSING": "0", **be.get("env", {})}
        for role in ("publisher", "reader"):
            spec = {"role": role, "model": model_dir, "dtype": p.dtype, "max_model_len": p.max_model_len,
                    "max_num_batched_tokens": p.max_num_batched_tokens, "enforce_eager": p.enforce_eager,
                    "kv_transfer_config": be["kv_transfer_config"],
                    "cpu_event_shim": be.get("cpu_event_shim", False), "repeats": p.repeats,
                    "repeat_budget_s": p.repeat_budget_s, "check_tokens": p.check_tokens,
                    "filler_token": 1000, "drain_s": 1.5, **prompts[role]}
            if config == "none" and role == "publisher":
                spec["reference_prompts"] = prompts["reader"]["prompts"]
            entry[role] = run_engine(spec, env, workdir, role, p.engine_timeout_s)
            if entry[role]["status"] != "measured":
                entry.update(status="failed", reason=f"{role}: {entry[role]['reason']}")
                break
        if config == "example":
            entry["example_files_bytes"] = sum(f.stat().st_size for f in workdir.rglob("*.safetensors"))
    entry.update(wall_s=time.perf_counter() - t0, loadavg_after=os.getloadavg())
    return entry


def run(p: VllmParams, progress: bool = True) -> Report:
    from inference.models import smollm2_dir

    model_dir = smollm2_dir()
    prompts = build_prompts(model_dir, p.lengths)
    results = []
    for config in p.configs:
        results.append(measure_config(config, prompts, model_dir, p))
        if progress:
            e = results[-1]
            print(f"kvbench vllm: {config}: {e['status']} in {e.get('wall_s', 0):.0f} s"
                  + (f" ({e['reason'][:200]})" if e["reason"] else ""), flush=True)
    rows = summarize(results)
    rat = ratios(rows, p)
    figures = {"units": "seconds (TTFT), prompt tokens per second", "model": "SmolLM2-135M (safetensors), bfloat16",
               "versions": versions(), "rows": rows, "ratios": rat, "configs": results}
    return Report("vllm", asdict(p), figures, table(rows), notes(rows, results, p, rat), plot(rows, p),
                  "vLLM: time to first token with and without KV connectors (publisher, then a fresh reader)")
