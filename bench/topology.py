"""Scenario `topology`: one document's KV fetched over links that stand for real placements,
against recomputing it (DESIGN §7). A kvstore node runs in a server namespace; the client runs
in a client namespace joined to it by one veth pair per link, shaped with tc tbf:
co-located (loopback, over gRPC and over the LMDB fast path), same rack (unshaped veth),
cross-zone (1 Gbit), cross-provider (100 Mbit + egress price). Without root or `ip netns`, only
the co-located links run. With --scale < 1 fewer tokens move and times extrapolate linearly.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, replace

from tqdm import tqdm

from . import economics as ec
from .netns import LinkSpec, NetnsLab, skip_reason
from .report import Report, Table, load_result
from .servers import kvstore_node, run_worker, socket_server

NODE_PORT, SOCK_PORT = 7070, 7071


@dataclass(frozen=True)
class Placement:
    name: str
    rate_bps: int | None  # tc tbf rate; None = unshaped
    egress_usd_per_gb: float
    netns: bool  # needs the namespace lab (False: loopback inside one namespace)
    colocated_reader: bool = False


def placements(egress_usd_per_gb: float) -> list[Placement]:
    return [
        Placement("co-located (LMDB map)", None, 0.0, False, colocated_reader=True),
        Placement("co-located (gRPC loopback)", None, 0.0, False),
        Placement("same rack (veth)", None, 0.0, True),
        Placement("cross-zone (1 Gbit)", 1_000_000_000, 0.0, True),
        Placement("cross-provider (100 Mbit)", 100_000_000, egress_usd_per_gb, True),
    ]


@dataclass(frozen=True)
class TopologyParams:
    tokens: int = ec.PAPER_DOC_TOKENS
    scale: float = 1.0
    transport: str = "grpc"  # or "socket": time the raw socket probe instead of a gRPC fetch
    loopback_only: bool = False
    codec: ec.Compression | None = None  # judge each link again with this codec on (kvbench compress)

    @property
    def measured_tokens(self) -> int:
        return max(1, round(self.tokens * self.scale))



def _measure_link(pl: Placement, p: TopologyParams, server_ns: str | None, client_ns: str | None,
                  host: str, node_port: int, sock_port: int) -> dict:
    ns = client_ns if pl.netns else server_ns
    toks = ["--tokens", str(p.measured_tokens)]
    nbytes = ec.kv_bytes(p.measured_tokens)
    # the probe moves about 1 s of traffic at the configured rate (64 MiB when unshaped)
    probe_bytes = min(nbytes, pl.rate_bps // 8) if pl.rate_bps else 64 << 20
    probe = ["--probe-addr", f"{host}:{sock_port}", "--bytes", str(max(probe_bytes, 4 << 20))]
    if p.transport == "socket" and not pl.colocated_reader:
        sock = run_worker(ns, "probe", "--addr", f"{host}:{sock_port}", "--bytes", str(max(probe_bytes, 4 << 20)))
        seconds, reads = nbytes * 8 / sock["bps"], {}
    else:
        extra = ["--colocated"] if pl.colocated_reader else []
        got = run_worker(ns, "fetch", "--addr", f"{host}:{node_port}", *toks, *extra, *probe)
        seconds, reads, sock = got["seconds"], got["reads"], got["probe"]
    return {"measured_seconds": seconds, "measured_bps": nbytes * 8 / seconds, "socket_bps": sock["bps"],
            "reads": reads}


def _link_row(pl: Placement, m: dict, p: TopologyParams, preset: ec.CostPreset) -> dict:
    nbytes = ec.kv_bytes(p.tokens)
    fetch_s = m["measured_seconds"] * p.tokens / p.measured_tokens  # linear extrapolation
    egress = ec.egress_usd(nbytes, pl.egress_usd_per_gb)
    prefill_s = ec.prefill_seconds(p.tokens, preset.prefill_tokens_per_s)
    v = ec.fetch_or_recompute(fetch_s, egress, prefill_s, preset.gpu_usd_per_hour)
    by_preset = {}  # the same measured link judged under every preset (a billed link pays its price)
    for name, q in ec.PRESETS.items():
        q_egress = ec.egress_usd(nbytes, q.egress_usd_per_gb) if pl.egress_usd_per_gb else 0.0
        q_prefill = ec.prefill_seconds(p.tokens, q.prefill_tokens_per_s)
        by_preset[name] = ec.fetch_or_recompute(fetch_s, q_egress, q_prefill, q.gpu_usd_per_hour).verdict
    compressed = _compressed(p.codec, pl, fetch_s, nbytes, prefill_s, preset) if p.codec else None
    return {
        "compressed": compressed,
        "name": pl.name, "configured_bps": pl.rate_bps, "measured_bps": m["measured_bps"],
        "socket_bps": m["socket_bps"],
        "shaping_ratio": m["socket_bps"] / pl.rate_bps if pl.rate_bps else None,
        "fetch_seconds": fetch_s, "egress_usd": egress, "fetch_usd": v.fetch_usd,
        "prefill_seconds": prefill_s, "prefill_usd": v.prefill_usd, "verdict": v.verdict,
        "verdict_by_preset": by_preset, "reads": m["reads"],
    }


def _compressed(codec: ec.Compression, pl: Placement, fetch_s: float, nbytes: int, prefill_s: float,
                preset: ec.CostPreset) -> dict:
    """The link with the codec on: 1/ratio of the bytes cross it (and are billed), then they are decoded;
    and the ratio from which fetching would win on this link."""
    seconds = ec.compressed_fetch_seconds(fetch_s, nbytes, codec)
    egress = ec.egress_usd(codec.stored_bytes(nbytes), pl.egress_usd_per_gb)
    v = ec.fetch_or_recompute(seconds, egress, prefill_s, preset.gpu_usd_per_hour)
    link_bps = nbytes * 8 / fetch_s
    break_even = ec.break_even_ratio(nbytes, prefill_s, preset.gpu_usd_per_hour, pl.egress_usd_per_gb, link_bps,
                                     codec.decode_seconds(nbytes))
    return {"codec": codec.name, "ratio": codec.ratio, "fetch_seconds": seconds, "egress_usd": egress,
            "fetch_usd": v.fetch_usd, "verdict": v.verdict, "break_even_ratio": break_even,
            "break_even_ratio_free_decode": ec.break_even_ratio(nbytes, prefill_s, preset.gpu_usd_per_hour,
                                                                pl.egress_usd_per_gb, link_bps)}


def measure(p: TopologyParams, preset: ec.CostPreset, progress: bool = True) -> tuple[list[dict], str | None]:
    all_links = placements(preset.egress_usd_per_gb)
    skipped = skip_reason(p.loopback_only)
    links = [pl for pl in all_links if not (pl.netns and skipped)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="kvbench-topology-") as data, \
            tqdm(total=len(links) + 1, desc="topology", disable=not progress, leave=False) as bar:
        map_gb = max(1.0, 3 * ec.kv_bytes(p.measured_tokens) / 2**30)
        if skipped:
            with kvstore_node(data, map_size_gb=map_gb) as node, socket_server() as sock:
                run_worker(None, "load", "--addr", f"127.0.0.1:{node.port}", "--tokens", str(p.measured_tokens))
                bar.update(1)
                for pl in links:
                    m = _measure_link(pl, p, None, None, "127.0.0.1", node.port, sock.port)
                    rows.append(_link_row(pl, m, p, preset))
                    bar.update(1)
            return rows, skipped
        specs = {pl.name: LinkSpec(pl.name, pl.rate_bps) for pl in links if pl.netns}
        with NetnsLab(list(specs.values())) as lab, \
                kvstore_node(data, f"0.0.0.0:{NODE_PORT}", lab.server_ns, map_gb), \
                socket_server(f"0.0.0.0:{SOCK_PORT}", lab.server_ns):
            run_worker(lab.server_ns, "load", "--addr", f"127.0.0.1:{NODE_PORT}", "--tokens", str(p.measured_tokens))
            bar.update(1)
            for pl in links:
                host = lab.server_ip(specs[pl.name]) if pl.netns else "127.0.0.1"
                m = _measure_link(pl, p, lab.server_ns, lab.client_ns, host, NODE_PORT, SOCK_PORT)
                rows.append(_link_row(pl, m, p, preset))
                bar.update(1)
    return rows, None


def report(p: TopologyParams, preset: ec.CostPreset, rows: list[dict], skipped: str | None) -> Report:
    nbytes = ec.kv_bytes(p.tokens)
    prefill_s = ec.prefill_seconds(p.tokens, preset.prefill_tokens_per_s)
    cross = ec.crossover_bps(nbytes, prefill_s)
    prefill_cost = ec.prefill_usd(p.tokens, preset.prefill_tokens_per_s, preset.gpu_usd_per_hour)
    egress_full = ec.egress_usd(nbytes, preset.egress_usd_per_gb)
    figures = {
        "tokens": p.tokens, "measured_tokens": p.measured_tokens, "kv_bytes": nbytes,
        "extrapolated": p.measured_tokens != p.tokens, "preset": asdict(preset),
        "links": rows, "crossover_bps": cross,
        "crossover_bps_by_preset": {
            name: ec.crossover_bps(nbytes, ec.prefill_seconds(p.tokens, q.prefill_tokens_per_s))
            for name, q in ec.PRESETS.items()},
        "cross_provider_recompute_at_any_bandwidth": ec.always_recompute(egress_full, prefill_cost),
        "netns_skipped": skipped,
    }
    notes = [f"{p.tokens} tokens of Qwen3-4B fp16 KV = {nbytes / 1e6:.1f} MB; preset `{preset.name}`: "
             f"{preset.prefill_tokens_per_s:.1f} prefill tok/s, ${preset.gpu_usd_per_hour}/GPU-hour ({preset.note})."]
    if figures["extrapolated"]:
        notes.append(f"Quick mode: {p.measured_tokens} tokens moved, fetch times extrapolated linearly to {p.tokens}.")
    if skipped:
        notes.append(f"Namespace links skipped ({skipped}): loopback links only.")
    notes.append(f"Crossover: fetch time = re-prefill time at {cross / 1e6:.0f} Mbit/s "
                 f"(H100 preset: {figures['crossover_bps_by_preset']['h100'] / 1e9:.1f} Gbit/s).")
    if figures["cross_provider_recompute_at_any_bandwidth"]:
        notes.append(f"Egress ${egress_full:.4f} > prefill ${prefill_cost:.4f} "
                     f"({egress_full / prefill_cost:.1f}x): across providers, recompute at any bandwidth.")
    notes.append("tc tbf shapes the server->client direction; socket_bps is a raw TCP probe of each link; "
                 "measured_bps is the fetch itself (gRPC, or the LMDB map for the first link).")
    table_rows = [[r["name"], _fmt_bps(r["configured_bps"]), _fmt_bps(r["measured_bps"]), _fmt_bps(r["socket_bps"]),
                   r["fetch_seconds"], r["egress_usd"], r["prefill_seconds"], r["prefill_usd"], r["verdict"],
                   r["verdict_by_preset"]["h100"]] + (_codec_cells(r["compressed"]) if p.codec else [])
                  for r in rows]
    if p.codec:
        notes.append(f"With {p.codec.name} on ({p.codec.ratio:.3f}x, decode {p.codec.decode_bytes_per_s / 1e9:.2f} GB/s, "
                     "measured by kvbench compress): 1/ratio of the bytes cross the link and are billed, decoding is "
                     "added after the transfer. Break-even ratio: the ratio from which fetching would win on that link "
                     "(decode time counted; inf: decoding alone takes longer than the prefill).")

    def plot(fig) -> None:
        ax = fig.add_subplot(1, 1, 1)
        names = [r["name"].replace(" (", "\n(") for r in rows]
        colors = ["C2" if r["verdict"] == "fetch" else "C3" for r in rows]
        ax.bar(names, [r["fetch_seconds"] for r in rows], color=colors)
        ax.axhline(prefill_s, color="k", ls="--", label=f"re-prefill {prefill_s:.3g} s ({preset.name})")
        ax.set_yscale("log")
        ax.set_ylabel(f"fetch seconds, {p.tokens} tokens")
        ax.tick_params(axis="x", labelsize=7)
        ax.legend()
        ax.set_title("Fetch vs re-prefill per placement (green: fetch, red: recompute)")

    headers = ["link", "configured", "measured (fetch)", "socket probe", "fetch s", "egress $",
               "prefill s", "prefill $", "verdict", "verdict (h100 preset)"]
    if p.codec:
        headers += [f"fetch s ({p.codec.name})", "egress $ (codec)", "verdict (codec)", "break-even ratio"]
    return Report("topology", {**asdict(p), "preset": preset.name}, figures, Table(headers, table_rows),
                  notes, plot, "Topology: fetch or recompute, per placement")


def _codec_cells(c: dict) -> list:
    return [c["fetch_seconds"], c["egress_usd"], c["verdict"], c["break_even_ratio"]]


def _fmt_bps(bps: float | None) -> str:
    if bps is None:
        return "unshaped"
    return f"{bps / 1e9:.2f} Gbit/s" if bps >= 1e9 else f"{bps / 1e6:.1f} Mbit/s"


def run(p: TopologyParams, preset: ec.CostPreset, progress: bool = True, rejudge: str | None = None) -> Report:
    if rejudge:
        return judge_again(p, preset, rejudge)
    rows, skipped = measure(p, preset, progress)
    return report(p, preset, rows, skipped)


def judge_again(p: TopologyParams, preset: ec.CostPreset, folder: str) -> Report:
    """The links of an earlier topology.json (what they measured does not depend on the codec),
    judged again under `preset` and `p.codec`, without moving any bytes."""
    old = load_result(folder, "topology")
    if old is None:
        raise SystemExit(f"kvbench topology: no topology.json in {folder}")
    p = replace(p, tokens=old["tokens"], scale=old["measured_tokens"] / old["tokens"])
    by_name = {pl.name: pl for pl in placements(preset.egress_usd_per_gb)}
    rows = []
    for link in old["links"]:
        m = {"measured_seconds": link["fetch_seconds"] * p.measured_tokens / p.tokens,
             "measured_bps": link["measured_bps"], "socket_bps": link["socket_bps"], "reads": link["reads"]}
        rows.append(_link_row(by_name[link["name"]], m, p, preset))
    out = report(p, preset, rows, old.get("netns_skipped"))
    # judged again from a file that was itself judged again: the links keep their first provenance
    source = old.get("rejudged_from") or {"created": old["created"], "commit": old["env"]["git_commit"]}
    out.notes.append(f"Links as measured on {source['created']} (commit {str(source['commit'])[:12]}), "
                     "judged again here with the codec on (kvbench topology --rejudge).")
    out.figures["rejudged_from"] = source
    return out
