"""Scenario `reuse`: per prompt length, the prefill time against the reuse time (fetch of the
cached prefix + prefill of the rest + first token) for each transport, their ratio r, the KV
bytes per token and N* = r/(r-1) (DESIGN §7; the paper: 8.6x at 255 tokens, 49.7x at 3774).

Transports: `local` (LocalStore, LMDB in this process, no gRPC), `colocated` (a kvstore node on
loopback, read through its LMDB map), `grpc` (the same node, gRPC only).
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass

from tqdm import tqdm

from . import economics as ec
from .report import Report, Table
from .servers import kvstore_node

TRANSPORTS = ("local", "colocated", "grpc")


@dataclass(frozen=True)
class ReuseParams:
    model: str = "smollm2"
    lengths: tuple[int, ...] = (256, 512, 1024, 2048)
    transports: tuple[str, ...] = TRANSPORTS
    repeats: int = 3
    device: str = "cpu"
    dtype: str = "float32"
    threads: int | None = 1  # torch CPU threads; None = torch's default


def sync(device) -> None:
    import torch

    if getattr(device, "type", str(device)).startswith("cuda"):
        torch.cuda.synchronize(device)


def _timed(gen, ids, device) -> tuple[float, object]:
    """Wall time of a 1-token generate: fetch + prefill of the uncached rest + first token."""
    sync(device)
    t0 = time.perf_counter()
    result = gen.generate(ids, 1, do_sample=False)
    sync(device)
    return time.perf_counter() - t0, result


@contextlib.contextmanager
def _clients(transports, tmp: str):
    """One store client per transport; the kvstore node starts only when a transport needs it."""
    from kvclient import Client
    from kvstore.local import LocalStore

    with contextlib.ExitStack() as stack:
        out = {}
        node = None
        for name in transports:
            if name == "local":
                out[name] = stack.enter_context(LocalStore(f"{tmp}/local", map_size_gb=16))
                continue
            if node is None:
                node = stack.enter_context(kvstore_node(f"{tmp}/node", map_size_gb=16))
            out[name] = stack.enter_context(
                Client([f"127.0.0.1:{node.port}"], replication=1, timeout=60, colocated=name == "colocated"))
        yield out


def measure(p: ReuseParams, progress: bool = True) -> tuple[list[dict], dict]:
    import torch

    from inference import KVLayout
    from inference.models import load_model

    unknown = set(p.transports) - set(TRANSPORTS)
    if unknown:
        raise ValueError(f"unknown transports {sorted(unknown)}: use {', '.join(TRANSPORTS)}")
    if p.threads:
        torch.set_num_threads(p.threads)
    model, tokenizer = load_model(p.model, dtype=getattr(torch, p.dtype), device=p.device)
    layout = KVLayout.of(model)
    device = layout.device
    info = {"kv_bytes_per_token": layout.bytes_per_token, "device": str(device),
            "torch_threads": torch.get_num_threads(),
            "model_config": {k: getattr(model.config, k, None) for k in
                             ("num_hidden_layers", "num_key_value_heads", "head_dim", "hidden_size")}}
    steps = len(p.lengths) * (1 + len(p.transports))
    with tempfile.TemporaryDirectory(prefix="kvbench-reuse-") as tmp, _clients(p.transports, tmp) as clients, \
            tqdm(total=steps, desc="reuse", disable=not progress, leave=False) as bar:
        variants = {name: (clients[name], {}) for name in p.transports}
        rows = measure_rows(model, tokenizer, variants, p.lengths, p.repeats, bar.update)
    return rows, info


def measure_rows(model, tokenizer, variants: dict, lengths, repeats: int, tick=lambda: None) -> list[dict]:
    """Prefill vs reuse per length for each variant `name -> (client, CachedGenerator options)`.

    Prefill is a miss on a fresh tenant each run; reuse is timed after one request published
    the prefix. Medians of `repeats` runs. The first variant's store serves the misses.
    """
    import torch

    from inference import CachedGenerator

    device = next(model.parameters()).device
    first = next(iter(variants.values()))[0]

    def timed_miss(ids, salt: str) -> tuple[float, object]:
        with CachedGenerator(model, first, tokenizer, tenant_salt=salt.encode(), publish=False) as gen:
            return _timed(gen, ids, device)

    rows = []
    rng = torch.Generator().manual_seed(0)
    timed_miss(torch.randint(0, model.config.vocab_size, (1, 64), generator=rng).to(device), "warm-up")
    for n in lengths:
        ids = torch.randint(0, model.config.vocab_size, (1, n), generator=rng).to(device)
        cold = [timed_miss(ids, f"cold-{n}-{r}") for r in range(repeats)]
        prefill_s = statistics.median(t for t, _ in cold)
        reference = cold[0][1].new_tokens.cpu()
        tick()
        stores: list = []  # variants over one store share its published blocks (one writer prefill)
        for name, (client, options) in variants.items():
            if client not in stores:
                stores.append(client)
                with CachedGenerator(model, client, tokenizer, tenant_salt=f"reuse-{len(stores)}".encode()) as writer:
                    writer.generate(ids, 1, do_sample=False)
                    writer.flush()
            salt = f"reuse-{stores.index(client) + 1}".encode()
            with CachedGenerator(model, client, tokenizer, tenant_salt=salt, publish=False, **options) as reader:
                warm_runs = [_timed(reader, ids, device) for _ in range(repeats)]
            reuse_s = statistics.median(t for t, _ in warm_runs)
            last = warm_runs[-1][1]
            rows.append({
                "tokens": n, "transport": name, "torch_threads": torch.get_num_threads(),
                "prefill_seconds": prefill_s, "reuse_seconds": reuse_s,
                "ratio": prefill_s / reuse_s, "n_star": ec.break_even_reuses(prefill_s / reuse_s),
                "cached_tokens": last.cached_tokens, "fetch_seconds": last.fetch_seconds,
                "load_seconds": last.load_seconds,
                "rest_prefill_seconds": last.prefill_seconds, "fetched_bytes": last.fetched_bytes,
                "exact_first_token": bool(torch.equal(last.new_tokens.cpu(), reference)),
            })
            tick()
    return rows


def report(p: ReuseParams, rows: list[dict], info: dict) -> Report:
    figures = {**info, "rows": rows}
    notes = [
        f"Model {p.model} on {info['device']} ({p.dtype}); KV {info['kv_bytes_per_token']:,} B/token; "
        f"median of {p.repeats} runs per cell; {info['torch_threads']} torch thread(s); "
        "prefill = a cache miss on a fresh tenant.",
        "reuse = wall time of a 1-token generate with the prefix cached: fetch + prefill of the uncached "
        "rest (the tail block and the last token are always computed) + first token; CachedGenerator's "
        "defaults (the load runs behind the forward when torch leaves a core free); load s = the whole "
        "load, start to end.",
        "N* = r/(r-1) reuses pay back storing the KV (paper: 8.6x -> 1.13 at 255 tokens, 49.7x -> 1.02 at 3774).",
    ]
    if not all(r["exact_first_token"] for r in rows):
        notes.append("WARNING: a reused run's first token differs from the prefill's.")
    table_rows = [[r["tokens"], r["transport"], r["prefill_seconds"], r["reuse_seconds"], r["load_seconds"],
                   r["cached_tokens"], r["ratio"], r["n_star"]] for r in rows]

    def plot(fig) -> None:
        ax, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
        lengths = sorted({r["tokens"] for r in rows})
        prefill = {r["tokens"]: r["prefill_seconds"] for r in rows}
        ax.plot(lengths, [prefill[n] for n in lengths], "k^-", label="prefill")
        for name in dict.fromkeys(r["transport"] for r in rows):
            mine = [r for r in rows if r["transport"] == name]
            ax.plot([r["tokens"] for r in mine], [r["reuse_seconds"] for r in mine], "o-", label=f"reuse, {name}")
            ax2.plot([r["tokens"] for r in mine], [r["ratio"] for r in mine], "o-", label=name)
        for a in (ax, ax2):
            a.set_xscale("log", base=2)
            a.set_xlabel("prompt tokens")
            a.legend(fontsize=8)
            a.grid(True, which="both", alpha=0.3)
        ax.set_yscale("log")
        ax.set_ylabel("seconds to first token")
        ax2.set_ylabel("r = prefill / reuse")
        ax.set_title(f"{p.model} on {info['device']}", fontsize=9)
        ax2.set_title("reuse speed-up", fontsize=9)

    headers = ["tokens", "transport", "prefill s", "reuse s", "load s", "cached", "r", "N*"]
    return Report("reuse", asdict(p), figures, Table(headers, table_rows), notes, plot,
                  f"Reuse: prefill vs cached reuse ({p.model})")


def run(p: ReuseParams, progress: bool = True) -> Report:
    rows, info = measure(p, progress)
    return report(p, rows, info)
