"""Scenario `stripe`: striped parallel fetch across replicas, against fetching from primaries.

Three kvstore nodes at replication 3, each behind its own link: a veth pair per node between a
server and a client namespace, shaped with tc tbf (default 1 Gbit/s, a cross-zone link), or
loopback where namespaces are unavailable (--loopback-only). One client fetches a document's KV
(Qwen3-4B shape, 36 records per 256-token block) three ways, interleaved round by round:

- primaries: `Client(stripe=False)`: every record from its first replica. A block's 36 layer
  records share one ring position, so a short document sits on one node whatever the ring;
- striped: `Client(stripe=True)` (the default): each block's records rotate over its replicas,
  one stream per node, all nodes in parallel;
- striped, 2 streams per node: the striped plan with each node's share split over two
  concurrent streams, to see whether more streams than nodes help.

Run where `ip netns` works (root); elsewhere the nodes run on loopback.
"""

from __future__ import annotations

import contextlib
import tempfile
from dataclasses import asdict, dataclass

from tqdm import tqdm

from . import economics as ec
from .netns import LinkSpec, NetnsLab, skip_reason
from .report import Report, Table
from .servers import kvstore_node, run_worker

MODES = ("primaries", "striped", "striped-2-streams")
BASE_PORT = 7170


@dataclass(frozen=True)
class StripeParams:
    tokens: tuple[int, ...] = (256, 1024, 3774)
    nodes: int = 3
    rate_bps: int | None = 1_000_000_000  # per node link; None = unshaped veth
    repeats: int = 3
    loopback_only: bool = False



@contextlib.contextmanager
def _cluster(p: StripeParams, data: str, skipped: str | None):
    """(client namespace or None, node addresses as the client reaches them, link label)."""
    map_gb = max(1.0, 1.5 * sum(ec.kv_bytes(n) for n in p.tokens) / 2**30)
    with contextlib.ExitStack() as stack:
        if skipped:
            nodes = [stack.enter_context(kvstore_node(f"{data}/n{j}", map_size_gb=map_gb)) for j in range(p.nodes)]
            yield None, [f"127.0.0.1:{n.port}" for n in nodes], "loopback"
            return
        links = [LinkSpec(f"node{j}", p.rate_bps) for j in range(p.nodes)]
        lab = stack.enter_context(NetnsLab(links))
        for j in range(p.nodes):
            stack.enter_context(kvstore_node(f"{data}/n{j}", f"0.0.0.0:{BASE_PORT + j}", lab.server_ns, map_gb))
        label = f"{p.rate_bps / 1e9:g} Gbit/s tbf per node" if p.rate_bps else "unshaped veth per node"
        yield lab.client_ns, [f"{lab.server_ip(link)}:{BASE_PORT + j}" for j, link in enumerate(links)], label


def measure(p: StripeParams, progress: bool = True) -> tuple[list[dict], str, str | None]:
    skipped = skip_reason(p.loopback_only)
    rows = []
    with tempfile.TemporaryDirectory(prefix="kvbench-stripe-") as data, _cluster(p, data, skipped) as (ns, addrs, label), \
            tqdm(total=len(p.tokens), desc="stripe", disable=not progress, leave=False) as bar:
        for n in p.tokens:
            got = run_worker(ns, "stripe", "--addrs", ",".join(addrs), "--tokens", str(n), "--seed", str(n),
                          "--repeats", str(p.repeats))
            for mode in MODES:
                m = got["modes"][mode]
                rows.append({"tokens": n, "blocks": got["blocks"], "bytes": got["bytes"], "mode": mode,
                             "seconds": m["seconds"], "gbps": got["bytes"] / m["seconds"] / 1e9,
                             "busiest_node_share": m["busiest_node_share"], "streams": m["streams"],
                             "samples": m["samples"],
                             "speedup": got["modes"]["primaries"]["seconds"] / m["seconds"]})
            bar.update(1)
    return rows, label, skipped


def run(p: StripeParams, progress: bool = True) -> Report:
    rows, label, skipped = measure(p, progress)
    figures = {"link": label, "nodes": p.nodes, "replication": p.nodes, "rows": rows, "netns_skipped": skipped}
    link_gbps = (p.rate_bps or 0) / 8e9
    notes = [
        f"{p.nodes} kvstore nodes at replication {p.nodes}, each behind its own link ({label}); one client in "
        "its own process; Qwen3-4B-shaped records (36 per 256-token block); median of "
        f"{p.repeats} interleaved rounds; speed-up against fetching from primaries.",
        "busiest node share = the fraction of the bytes the most loaded node serves: the fetch takes as long "
        "as that node's link needs for it" + (f" ({link_gbps:.3f} GB/s per link)." if p.rate_bps and not skipped
                                               else "."),
        "A block's 36 records share one ring position (one set of owners), so from primaries a 1-block "
        "document comes from one node; striping rotates each block's records over its replicas.",
    ]
    if skipped:
        notes.append(f"Namespace links skipped ({skipped}): all nodes on loopback, so the client's CPU, "
                     "not any link, bounds every mode.")
    table = Table(["tokens", "blocks", "MB", "mode", "streams", "seconds", "GB/s", "busiest node share", "speed-up"],
                  [[r["tokens"], r["blocks"], r["bytes"] / 1e6, r["mode"], r["streams"], r["seconds"], r["gbps"],
                    r["busiest_node_share"], r["speedup"]] for r in rows])

    def plot(fig) -> None:
        ax = fig.add_subplot(1, 1, 1)
        tokens = sorted({r["tokens"] for r in rows})
        width = 0.8 / len(MODES)
        for k, mode in enumerate(MODES):
            mine = {r["tokens"]: r["gbps"] for r in rows if r["mode"] == mode}
            ax.bar([i + k * width for i in range(len(tokens))], [mine[t] for t in tokens], width, label=mode)
        if p.rate_bps and not skipped:
            ax.axhline(link_gbps, color="k", ls=":", label="one link")
            ax.axhline(link_gbps * p.nodes, color="k", ls="--", label=f"{p.nodes} links")
        ax.set_xticks([i + width for i in range(len(tokens))], [f"{t} tokens" for t in tokens])
        ax.set_ylabel("fetch GB/s")
        ax.set_title(f"Striped fetch over {p.nodes} replicas ({label})")
        ax.legend(fontsize=8)

    return Report("stripe", asdict(p), figures, table, notes, plot, "Striped fetch across replicas")
