"""`kvbench load`: how fast a cached prefix reaches the model, per path, in one run.

Measures memcpy bandwidth (the ceiling), the co-located path (a same-host node's LMDB map straight
into KV tensors) and gRPC, on the same synthetic KV records laid out for a real model; then the
load time per token from short to long prompts (it must grow linearly); then prefill vs reuse
(fetch + prefill of the rest + first token) for the real model over both paths, at one and
at two torch threads (side by side: a one-token step is memory-bound and barely gains from a
second core, a prefill nearly doubles).

Loads go into one set of warm KV buffers, as CachedGenerator's pool hands them out; the
per-token figures are the best of enough runs that every length gets about the same time.
"""

from __future__ import annotations

import hashlib
import statistics
import tempfile
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from kvclient import Client
from kvproto.keys import namespace

from .report import Report, Table
from .reuse import measure_rows, sync
from .servers import kvstore_node


@dataclass(frozen=True)
class LoadParams:
    model: str = "smollm2"
    lengths: tuple[int, ...] = (256, 1024, 4096, 16384)  # load-time linearity
    reuse_lengths: tuple[int, ...] = (512, 2048, 8192)
    repeats: int = 3
    threads: tuple[int, ...] = (1, 2)  # torch CPU threads of the reuse rows
    device: str = "cpu"
    dtype: str = "float32"


def _timed_runs(fn, repeats: int, pick=min) -> float:
    """pick (min or a median) of `repeats` timed calls of fn, after one untimed warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return pick(times)


def memcpy_gbps(nbytes: int, device: torch.device, repeats: int) -> float:
    """Host memory into the destination (a warm host tensor, or the device from pinned memory),
    the ceiling any load path can reach."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda").random_()
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)

    def copy():
        dst.copy_(src)
        sync(device)

    return nbytes / _timed_runs(copy, repeats) / 1e9


def store_synthetic(writer: Client, layout, tokens: int, seed: int):
    """Random KV of `tokens` tokens for `layout`, stored as the generator stores blocks."""
    from inference.blocks import export_segment, plan_prefix
    from transformers import DynamicCache

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 30000, (tokens,), generator=gen).tolist()
    plan = plan_prefix(namespace(hashlib.sha256(f"load-{seed}".encode()).hexdigest()), ids, 256)
    shape = (1, layout.kv_heads, tokens, layout.head_dim)
    data = [(torch.randn(shape, generator=gen, dtype=layout.dtype), torch.randn(shape, generator=gen, dtype=layout.dtype))
            for _ in range(layout.num_layers)]
    cache = DynamicCache(ddp_cache_data=data)
    for key, start, count in plan.segments():
        writer.put_many(export_segment(cache, key, start, count))
    return plan


def time_loads(paths: dict, plans: dict, layout, buffers, rounds: int) -> dict[tuple[str, int], float]:
    """Best load time per (path, prompt length); `paths` maps a name to (client, verify).

    Measured in interleaved rounds (every path and length once per round, a short load several
    times), so a burst of noise on this shared box hits all lengths and paths alike instead of
    one of them.
    """
    from inference.loader import load_prefix

    def load(client, verify, plan) -> None:
        prefix = load_prefix(client, plan, layout, verify=verify, buffers=buffers)
        sync(layout.device)
        if prefix.tokens != plan.num_tokens:
            raise RuntimeError(f"loaded {prefix.tokens} of {plan.num_tokens} tokens: {dict(prefix.reasons)}")

    best = {(name, n): float("inf") for name in paths for n in plans}
    for client, verify in paths.values():
        for plan in plans.values():
            load(client, verify, plan)  # first touch of the node's freshly written pages
    for _ in range(rounds):
        for n, plan in plans.items():
            for name, (client, verify) in paths.items():
                for _ in range(max(1, 4096 // n)):
                    t0 = time.perf_counter()
                    load(client, verify, plan)
                    best[name, n] = min(best[name, n], time.perf_counter() - t0)
    return best


def resident_seconds(model, layout, tokens: int, repeats: int) -> float:
    """The ceiling of any store: a 1-token generate whose prefix KV already sits in warm KV buffers
    (no lookup, no load): reuse minus everything the store does. Median of `repeats` runs."""
    from inference.generator import CACHE_KWARG
    from inference.graphs import static_cache
    from inference.kvbuffers import KVBuffers

    device = layout.device
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(tokens))
    ids = ids.to(device)
    buffers = KVBuffers(layout, tokens + 8)
    with torch.inference_mode():
        prefix = model(ids[:, :-1], use_cache=True).past_key_values
        for both, layer in zip(buffers.layers, prefix.layers):
            both[0, :, :, : tokens - 1].copy_(layer.keys[0])
            both[1, :, :, : tokens - 1].copy_(layer.values[0])
    del prefix

    def once() -> None:
        cache = buffers.cache(tokens - 1)
        if torch.device(device).type == "cuda":  # what CachedGenerator runs on there (graphs)
            cache = static_cache(buffers.kv, tokens - 1, tokens + 1) or cache
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), **{CACHE_KWARG: cache},
                           use_cache=True, max_new_tokens=1, do_sample=False, return_dict_in_generate=True)
        sync(device)

    return _timed_runs(once, repeats, statistics.median)


def run(p: LoadParams, progress: bool = True) -> Report:
    from inference.blocks import KVLayout
    from inference.kvbuffers import KVBuffers
    from inference.models import load_model

    dtype = getattr(torch, p.dtype)
    model, tokenizer = load_model(p.model, dtype=dtype, device=p.device)
    layout = KVLayout.of(model)
    device = layout.device
    rows, load_rows = [], []
    with tempfile.TemporaryDirectory(prefix="kvbench-load-") as tmp, \
            kvstore_node(tmp, map_size_gb=64) as node:
        address = f"127.0.0.1:{node.port}"
        with Client([address], replication=1, colocated=True) as colo, \
                Client([address], replication=1, colocated=False) as grpc_client:
            bar = tqdm(total=len(p.lengths) + 5 * len(p.reuse_lengths) * len(p.threads), disable=not progress,
                       desc="load")
            buffers = KVBuffers(layout, max(p.lengths))
            plans = {n: store_synthetic(grpc_client, layout, n, seed=n) for n in p.lengths}
            best = time_loads({"colocated": (colo, True), "colocated_unverified": (colo, False)}, plans, layout,
                              buffers, 10 * p.repeats)
            best.update(time_loads({"grpc": (grpc_client, True)}, plans, layout, buffers, max(1, p.repeats - 1)))
            for n in p.lengths:
                row = {"tokens": n, "bytes": n * layout.bytes_per_token}
                for name in ("colocated", "grpc", "colocated_unverified"):
                    row[f"{name}_seconds"] = best[name, n]
                    row[f"{name}_us_per_token"] = best[name, n] / n * 1e6
                load_rows.append(row)
                bar.update()
            if colo.reader(address) is None:
                raise RuntimeError("the co-located path did not attach: the load figures would be gRPC's")
            del buffers
            biggest = load_rows[-1]
            memcpy = memcpy_gbps(biggest["bytes"], device, 10 * p.repeats)  # best of many, as the loads
            sync_load = {"pipeline_loads": False}
            variants = {"colocated": (colo, sync_load),
                        "colocated-unverified": (colo, {**sync_load, "verify_loads": False}),
                        "colocated-pipelined": (colo, {"pipeline_loads": True}), "grpc": (grpc_client, sync_load)}
            before = torch.get_num_threads()
            try:
                for threads in p.threads:
                    torch.set_num_threads(threads)
                    measured = measure_rows(model, tokenizer, variants, p.reuse_lengths, p.repeats, bar.update)
                    resident = {n: resident_seconds(model, layout, n, p.repeats) for n in p.reuse_lengths}
                    for row in measured:
                        row["resident_seconds"] = resident[row["tokens"]]
                        row["ceiling_ratio"] = row["prefill_seconds"] / row["resident_seconds"]
                        row["of_ceiling"] = row["ratio"] / row["ceiling_ratio"]
                    rows += measured
            finally:
                torch.set_num_threads(before)
            bar.close()
    per_token = [r["colocated_us_per_token"] for r in load_rows]
    spread = max(per_token) / min(per_token) - 1  # 0 = perfectly linear
    figures = {
        "memcpy_gbps": memcpy,
        "colocated_gbps": biggest["bytes"] / biggest["colocated_seconds"] / 1e9,
        "grpc_gbps": biggest["bytes"] / biggest["grpc_seconds"] / 1e9,
        "colocated_unverified_gbps": biggest["bytes"] / biggest["colocated_unverified_seconds"] / 1e9,
        "kv_bytes_per_token": layout.bytes_per_token,
        "load_per_token_spread": spread,
        "load_rows": load_rows,
        "rows": rows,
    }
    figures["colocated_over_memcpy"] = figures["colocated_gbps"] / memcpy
    figures["colocated_unverified_over_memcpy"] = figures["colocated_unverified_gbps"] / memcpy
    table = Table(["tokens", "threads", "transport", "prefill s", "reuse s", "ratio", "cached", "load s",
                   "resident s", "ceiling", "of ceiling"],
                  [[r["tokens"], r["torch_threads"], r["transport"], r["prefill_seconds"], r["reuse_seconds"],
                    r["ratio"], r["cached_tokens"], r["load_seconds"], r["resident_seconds"], r["ceiling_ratio"],
                    r["of_ceiling"]] for r in rows])
    notes = [
        f"memcpy {memcpy:.2f} GB/s, co-located {figures['colocated_gbps']:.2f} GB/s "
        f"({figures['colocated_over_memcpy']:.2f} of memcpy; without the per-read hash "
        f"{figures['colocated_unverified_gbps']:.2f} GB/s, {figures['colocated_unverified_over_memcpy']:.2f}), "
        f"gRPC {figures['grpc_gbps']:.2f} GB/s, "
        f"at {biggest['tokens']} tokens ({biggest['bytes'] / 1e6:.0f} MB) on {device}.",
        "load time per token (co-located), µs: " + ", ".join(
            f"{r['tokens']}: {r['colocated_us_per_token']:.2f}" for r in load_rows) + f" (spread {spread:.1%}).",
        "reuse = a 1-token generate with the prefix cached (load + the last prompt token + first token); "
        "pipelined = the forward starts while later layers are still loading (CachedGenerator's default "
        "when torch leaves a core free), the others load first; median of "
        f"{p.repeats} runs; load s = the whole load, start to end.",
        "resident = the same 1-token generate with the prefix KV already in warm buffers (no store at all): "
        "ceiling = prefill / resident is the most any store could reach on this model and machine, and "
        "of ceiling = ratio / ceiling. The resident step streams every weight once and barely gains from "
        "a second thread, while prefill nearly halves: the ceiling falls with threads.",
    ]
    return Report("load", p.__dict__, figures, table, notes, plot=lambda fig: _plot(fig, load_rows),
                  title=f"KV load paths — {p.model} on {device}")


def _plot(fig, load_rows: list[dict]) -> None:
    ax = fig.add_subplot(1, 1, 1)
    tokens = [r["tokens"] for r in load_rows]
    ax.plot(tokens, [r["colocated_seconds"] * 1e3 for r in load_rows], "o-", label="co-located (LMDB map)")
    ax.plot(tokens, [r["colocated_unverified_seconds"] * 1e3 for r in load_rows], "^-",
            label="co-located, no per-read hash")
    ax.plot(tokens, [r["grpc_seconds"] * 1e3 for r in load_rows], "s-", label="gRPC loopback")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("cached prompt tokens")
    ax.set_ylabel("load time (ms)")
    ax.set_title("KV load time against prompt length (linear = slope 1)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
