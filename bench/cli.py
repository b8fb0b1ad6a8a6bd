"""`kvbench SCENARIO --out DIR`: run a benchmark scenario and write DIR/SCENARIO.{json,md,png}.

Scenarios: economics (the cost model, beside measured figures with --from DIR), transport (gRPC
vs raw socket), topology (namespaces + tc links), reuse (prefill vs cached reuse), load (KV load
paths, bench/load.py), stripe (striped fetch across replicas over shaped links), peers (this store
vs redis, Mooncake Store, safetensors files and a raw socket, same blocks), vllm (TTFT in vLLM with
no connector, this store's connector, vLLM's ExampleConnector and Mooncake's; not in `all`), compress (lossless
codecs on real KV beside the entropy bound; not in `all`), all (transport,
topology, stripe, peers, reuse, load, then economics over their results).

Results go to an untracked folder by default (bench/out, git-ignored); the committed ones under
bench/results/ are refreshed only on purpose (`--out bench/results/quick`). Exit status: 0, or 3
when a target a scenario checks is not met (listed on stderr; `--targets warn` reports them
and exits 0).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time
from collections.abc import Sequence

from .economics import PRESETS
from .report import write_report

DEFAULT_OUT = "bench/out"
TARGETS_NOT_MET = 3


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    p.add_argument("--quick", action="store_true", help="small sizes: seconds, not minutes")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--targets", choices=("fail", "warn"), default="fail",
                   help="a target not met: exit 3 (fail, the default) or only say so (warn)")


def _add_cost(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(PRESETS), default="paper",
                   help="GPU $/hour and prefill tok/s preset (default paper; see bench/economics.py)")
    p.add_argument("--gpu-usd-per-hour", type=float, default=None, help="override the preset")
    p.add_argument("--prefill-tps", type=float, default=None, help="prefill tokens/s, override the preset")
    p.add_argument("--egress-usd-per-gb", type=float, default=None, help="override the preset")


def _add_codec(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compress-from", default=None,
                   help="directory with compress.json: judge again with its measured codec (zstd-grouped) on")
    p.add_argument("--codec-ratio", type=float, default=None, help="compression ratio (overrides --compress-from)")
    p.add_argument("--codec-decode-gbps", type=float, default=None, help="decode GB/s of raw KV (with --codec-ratio)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="kvbench", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="scenario", required=True)

    e = sub.add_parser("economics", help="cost model vs the paper (and measured figures)")
    _add_common(e)
    _add_cost(e)
    e.add_argument("--from", dest="from_dir", default=None, help="directory with other scenarios' JSON")
    _add_codec(e)

    t = sub.add_parser("transport", help="gRPC vs raw socket throughput on loopback")
    _add_common(t)
    t.add_argument("--records", type=int, default=None, help="records per run (default 64; quick 16)")
    t.add_argument("--record-mib", type=float, default=4.0)
    t.add_argument("--repeats", type=int, default=None, help="runs (default 3; quick 2)")

    g = sub.add_parser("topology", help="fetch one document's KV over shaped links, verdict per link")
    _add_common(g)
    _add_cost(g)
    g.add_argument("--tokens", type=int, default=3774, help="document tokens (default 3774)")
    g.add_argument("--scale", type=float, default=None,
                   help="fraction of the tokens actually moved; times extrapolate linearly (quick 0.1)")
    g.add_argument("--transport", choices=["grpc", "socket"], default="grpc")
    g.add_argument("--loopback-only", action="store_true", help="skip the namespace links")
    _add_codec(g)
    g.add_argument("--rejudge", default=None, metavar="DIR",
                   help="judge the links of DIR/topology.json again (with the codec on) instead of measuring")

    r = sub.add_parser("reuse", help="prefill vs reuse (fetch + rest + first token) per transport")
    _add_common(r)
    r.add_argument("--model", default="smollm2", help="tiny-qwen3, smollm2, qwen3-4b-random or a PATH")
    r.add_argument("--lengths", default=None, help="comma-separated token counts (default 256,512,1024,2048)")
    r.add_argument("--transports", default="local,colocated,grpc",
                   help="comma-separated: local (LocalStore), colocated (node LMDB map), grpc")
    r.add_argument("--repeats", type=int, default=None, help="timed runs per cell, median (default 3)")
    r.add_argument("--device", default="cpu")
    r.add_argument("--dtype", default="float32")
    r.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on a busy 2-core box 2 OpenMP threads slow small "
                        "matmuls by up to 60x); 0 = torch's default")

    ld = sub.add_parser("load", help="KV load paths: memcpy vs co-located vs gRPC, load time vs length")
    _add_common(ld)
    ld.add_argument("--model", default="smollm2")
    ld.add_argument("--device", default="cpu")
    ld.add_argument("--dtype", default="float32")
    ld.add_argument("--lengths", default=None, help="load-time lengths (default 256,1024,4096,16384)")
    ld.add_argument("--reuse-lengths", default=None, help="prefill vs reuse lengths (default 512,2048,8192)")
    ld.add_argument("--repeats", type=int, default=None, help="timed runs, best kept (default 3)")
    ld.add_argument("--threads", default=None, help="torch threads of the reuse rows, comma-separated (default 1,2)")

    st = sub.add_parser("stripe", help="striped fetch across replicas vs primaries, one link per node")
    _add_common(st)
    st.add_argument("--tokens", default=None, help="document sizes, comma-separated (default 256,1024,3774)")
    st.add_argument("--nodes", type=int, default=3, help="nodes, all replicas of every key (default 3)")
    st.add_argument("--rate-mbit", type=float, default=1000.0, help="tbf rate per node link (default 1000; 0 = unshaped)")
    st.add_argument("--repeats", type=int, default=None, help="interleaved rounds, median (default 3)")
    st.add_argument("--loopback-only", action="store_true", help="no namespaces: every node on loopback")

    pe = sub.add_parser("peers", help="this store vs redis, Mooncake Store, safetensors files, raw socket")
    _add_common(pe)
    pe.add_argument("--blocks", type=int, default=None, help="256-token blocks per workload (default 16; quick 2)")
    pe.add_argument("--repeats", type=int, default=None, help="read passes, median (default 3; quick 1)")
    pe.add_argument("--clients", default="1,4", help="concurrent client counts, comma-separated (default 1,4)")
    pe.add_argument("--workloads", default="smollm2,qwen3-4b", help="comma-separated (default smollm2,qwen3-4b)")
    pe.add_argument("--peers", default=None, help="comma-separated subset (default all; see bench/peer_clients.py)")
    pe.add_argument("--machine-note", default="", help="what the notes say about the machine (e.g. shared, cores)")

    v = sub.add_parser("vllm", help="TTFT in vLLM: no connector, this store's, ExampleConnector, Mooncake Store's")
    _add_common(v)
    v.add_argument("--lengths", default=None, help="document tokens, comma-separated (default 1024,4096,7936; quick 1024)")
    v.add_argument("--repeats", type=int, default=None, help="reader runs per question, median (default 5; quick 1)")
    v.add_argument("--configs", default=None, help="comma-separated subset (default all; see bench/vllm_bench.py)")
    v.add_argument("--compile", action="store_true", help="let vLLM torch.compile (default enforce_eager: "
                   "compiling adds ~60-80 s to each of the 10 engine starts on CPU)")
    v.add_argument("--machine-note", default="", help="what the notes say about the machine (e.g. shared, cores)")

    c = sub.add_parser("compress", help="lossless codecs on real KV beside the entropy bound (not in `all`)")
    _add_common(c)
    c.add_argument("--models", default=None, help="comma-separated (default smollm2,tiny-qwen3,tiny-llama; quick tiny-qwen3)")
    c.add_argument("--tokens", type=int, default=None, help="prefill tokens (default 2048; quick 512)")
    c.add_argument("--record-tokens", default=None, help="tokens per record, comma-separated (default 2048,256)")
    c.add_argument("--repeats", type=int, default=None, help="timed repeats, best and median (default 5; quick 2)")

    cl = sub.add_parser("cluster", help="prefill CDN: hosts in namespaces, etcd membership, edge tier on/off (not in `all`)")
    _add_common(cl)
    cl.add_argument("--seconds", type=float, default=None, help="reading time per run (default 60; quick 24)")
    mk = sub.add_parser("market", help="context market: buyers x listings priced from measured reuse (not in `all`)")
    _add_common(mk)
    mk.add_argument("--model", default="tiny-qwen3")
    mk.add_argument("--doc-tokens", type=int, default=2000)
    a = sub.add_parser("all", help="every scenario, then economics over their results")
    _add_common(a)
    a.add_argument("--model", default=None, help="reuse model (default smollm2, else tiny-qwen3)")
    return ap


def _run_market(args) -> None:
    from . import market

    write_report(market.run(market.MarketParams(model=args.model, doc_tokens=args.doc_tokens)), args.out)


def _run_economics(args) -> None:
    from . import econ_scenario

    write_report(econ_scenario.run(econ_scenario.cost_preset(args), args.from_dir, econ_scenario.compression(args)),
                 args.out)


def _run_transport(args) -> None:
    from . import transport

    p = transport.TransportParams(
        records=args.records or (16 if args.quick else 64), record_mib=args.record_mib,
        repeats=args.repeats or (2 if args.quick else 3))
    write_report(transport.run(p, progress=not args.no_progress), args.out)


def _run_topology(args) -> None:
    from . import econ_scenario, topology

    scale = args.scale if args.scale is not None else (0.1 if args.quick else 1.0)
    p = topology.TopologyParams(tokens=args.tokens, scale=scale, transport=args.transport,
                                loopback_only=args.loopback_only, codec=econ_scenario.compression(args))
    write_report(topology.run(p, econ_scenario.cost_preset(args), progress=not args.no_progress, rejudge=args.rejudge),
                 args.out)


def _run_reuse(args) -> None:
    from . import reuse

    default = "256,512" if args.quick else "256,512,1024,2048"
    p = reuse.ReuseParams(
        model=args.model, lengths=tuple(int(x) for x in (args.lengths or default).split(",")),
        transports=tuple(x.strip() for x in args.transports.split(",") if x.strip()),
        repeats=args.repeats or (2 if args.quick else 3), device=args.device, dtype=args.dtype,
        threads=args.threads or None)
    write_report(reuse.run(p, progress=not args.no_progress), args.out)


def _run_load(args) -> None:
    from . import load

    opts = dict(lengths=(256, 1024, 4096), reuse_lengths=(512,), repeats=2) if args.quick else {}
    ints = lambda text: tuple(int(x) for x in text.split(","))  # noqa: E731
    if args.lengths:
        opts["lengths"] = ints(args.lengths)
    if args.reuse_lengths:
        opts["reuse_lengths"] = ints(args.reuse_lengths)
    if args.repeats:
        opts["repeats"] = args.repeats
    if args.threads:
        opts["threads"] = ints(args.threads)
    p = load.LoadParams(model=args.model, device=args.device, dtype=args.dtype, **opts)
    write_report(load.run(p, progress=not args.no_progress), args.out)


def _run_stripe(args) -> None:
    from . import stripe

    default = "256,1024" if args.quick else "256,1024,3774"
    p = stripe.StripeParams(
        tokens=tuple(int(x) for x in (args.tokens or default).split(",")), nodes=args.nodes,
        rate_bps=int(args.rate_mbit * 1e6) or None, repeats=args.repeats or (2 if args.quick else 3),
        loopback_only=args.loopback_only)
    if p.nodes < 2:
        raise SystemExit("kvbench stripe: --nodes must be at least 2 (striping needs replicas)")
    write_report(stripe.run(p, progress=not args.no_progress), args.out)


def _run_peers(args) -> None:
    from . import peers

    split = lambda text: tuple(x.strip() for x in text.split(",") if x.strip())  # noqa: E731
    p = peers.PeersParams(
        blocks=args.blocks or (2 if args.quick else 16), repeats=args.repeats or (1 if args.quick else 3),
        clients=tuple(int(x) for x in split(args.clients)), workloads=split(args.workloads),
        peers=split(args.peers) if args.peers else peers.PEERS, machine_note=args.machine_note)
    unknown = set(p.peers) - set(peers.PEERS) or set(p.workloads) - set(peers.WORKLOADS)
    if unknown:
        raise SystemExit(f"kvbench peers: unknown {sorted(unknown)}")
    write_report(peers.run(p, progress=not args.no_progress), args.out)


def _run_vllm(args) -> None:
    from . import vllm_bench

    split = lambda text: tuple(x.strip() for x in text.split(",") if x.strip())  # noqa: E731
    p = vllm_bench.VllmParams(
        lengths=tuple(int(x) for x in split(args.lengths or ("1024" if args.quick else "1024,4096,7936"))),
        repeats=args.repeats or (1 if args.quick else 5),
        configs=split(args.configs) if args.configs else vllm_bench.CONFIGS,
        enforce_eager=not args.compile, machine_note=args.machine_note)
    unknown = set(p.configs) - set(vllm_bench.CONFIGS)
    if unknown:
        raise SystemExit(f"kvbench vllm: unknown configurations {sorted(unknown)}")
    if max(p.lengths) + 64 > p.max_model_len:
        raise SystemExit(f"kvbench vllm: documents + question must fit max_model_len {p.max_model_len}")
    write_report(vllm_bench.run(p, progress=not args.no_progress), args.out)


def _run_compress(args) -> None:
    from . import compress

    split = lambda text: tuple(x.strip() for x in text.split(",") if x.strip())  # noqa: E731
    tokens = args.tokens or (512 if args.quick else 2048)
    record_tokens = tuple(int(x) for x in split(args.record_tokens)) if args.record_tokens else (
        (512, 256) if args.quick else (2048, 256))
    p = compress.CompressParams(
        models=split(args.models) if args.models else (("tiny-qwen3",) if args.quick else compress.MODELS),
        tokens=tokens, record_tokens=record_tokens, repeats=args.repeats or (2 if args.quick else 5))
    write_report(compress.run(p, progress=not args.no_progress), args.out)


def _run_all(args) -> None:
    base = ["--out", args.out, "--targets", "warn"] + (["--quick"] if args.quick else []) + \
        (["--no-progress"] if args.no_progress else [])  # `all` itself judges the targets at the end
    for argv in (["transport"], ["topology"], ["stripe"], ["peers"], ["reuse"], ["load"], ["economics", "--from", args.out]):
        t0 = time.perf_counter()
        if argv[0] in ("reuse", "load"):
            _with_model_fallback(argv[0], args.model, base)
        else:
            main([*argv, *base])
        print(f"kvbench: {argv[0]} done in {time.perf_counter() - t0:.1f}s", file=sys.stderr)


def _with_model_fallback(scenario: str, model: str | None, base: list[str]) -> None:
    """SmolLM2 unless another model is named; the tiny random model if SmolLM2 is not installed."""
    from inference.models import ModelUnavailable

    try:
        main([scenario, "--model", model or "smollm2", *base])
    except ModelUnavailable as exc:
        if model:
            raise
        print(f"kvbench: smollm2 unavailable ({exc}); {scenario} runs on tiny-qwen3", file=sys.stderr)
        main([scenario, "--model", "tiny-qwen3", *base])


def _run_cluster(args) -> None:
    from . import cluster

    seconds = args.seconds or (24.0 if args.quick else 60.0)
    report = cluster.run(cluster.ClusterParams(seconds=seconds))
    write_report(report, args.out)
    if not report.figures["target_met"]:
        print("kvbench cluster: target not met: local share with the edge tier below 0.8", file=sys.stderr)


RUNNERS = {"economics": _run_economics, "transport": _run_transport, "topology": _run_topology,
           "reuse": _run_reuse, "load": _run_load, "stripe": _run_stripe, "peers": _run_peers, "vllm": _run_vllm,
           "compress": _run_compress, "cluster": _run_cluster, "market": _run_market, "all": _run_all}


def unmet_targets(out: str, since: float) -> list[str]:
    """The targets that the results written to `out` since `since` check and do not meet."""
    unmet: list[str] = []
    for path in sorted(glob.glob(os.path.join(out, "*.json"))):
        if os.path.getmtime(path) < since:
            continue
        with open(path) as f:
            data = json.load(f)
        name = os.path.basename(path)[:-5]

        def walk(node) -> None:
            if isinstance(node, dict):
                if node.get("meets_target") is False:
                    unmet.append(f"{name}: target ratio {node.get('target_ratio')}")
                if node.get("met") is False:
                    unmet.append(f"{name}: {node.get('name', 'a target')}")
                for value in node.values():
                    walk(value)
            elif isinstance(node, list):
                for value in node:
                    walk(value)

        walk(data)
    return unmet


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.time() - 1.0  # file times have coarse resolution on some filesystems
    RUNNERS[args.scenario](args)
    if args.scenario != "all":
        print(f"kvbench: wrote {args.out}/{args.scenario}.{{json,md,png}}", file=sys.stderr)
    unmet = unmet_targets(args.out, started)
    for target in unmet:
        print(f"kvbench: {'warning' if args.targets == 'warn' else 'error'}: NOT met: {target}", file=sys.stderr)
    return TARGETS_NOT_MET if unmet and args.targets == "fail" else 0


if __name__ == "__main__":
    sys.exit(main())
