"""kvinfer: generate with KV reuse from a kvstore cluster, and verify it is token-exact.

    kvinfer --nodes A,B --model smollm2 --prompt-file doc.txt --max-new-tokens 24 --verify --json
    kvinfer --embedded 2 --model tiny-qwen3 --prompt-file doc.txt --max-new-tokens 24 --verify
    KVCACHE_NODES=cluster.json kvinfer --model smollm2 --prompt-file doc.txt --token T --tls-ca ca.pem

Exit status: 0 done, 1 error (including a store that does not answer, unless
--allow-store-down), 2 --verify found the reuse not token-exact.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from typing import Any

import torch

from .codec import CODECS
from .embedded import EmbeddedCluster
from .generator import CachedGenerator
from .models import MODEL_NAMES, decode_tokens, encode_prompt, load_model
from .verify import verify

log = logging.getLogger("kvinfer")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kvinfer", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--nodes", help="comma-separated HOST:PORT list or a cluster file (default: $KVCACHE_NODES)")
    where.add_argument("--embedded", type=int, metavar="N", help="start N nodes in this process (temp dirs)")
    where.add_argument("--local", metavar="DIR", help="an in-process LMDB store in DIR (no network)")
    p.add_argument("--model", required=True, help=f"{', '.join(MODEL_NAMES)} or a model directory")
    p.add_argument("--prompt-file", required=True, help="text file with the prompt ('-' for stdin)")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--prompt-tokens", type=int, metavar="N", help="keep only the first N prompt tokens")
    p.add_argument("--verify", action="store_true", help="also run without the cache and compare")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--codec", choices=sorted(CODECS), default="none", help="record codec (lossless; none is fastest co-located)")
    p.add_argument("--replication", type=int, default=2)
    p.add_argument("--token", default=None, help="auth token for the nodes")
    p.add_argument("--tls-ca", default=None, help="CA certificate (PEM) to verify the nodes")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per store call (default 10)")
    p.add_argument("--allow-store-down", action="store_true",
                   help="generate without reuse when no node answers (default: exit 1)")
    p.add_argument("--tenant-salt", default="", help="isolates this tenant's keys")
    p.add_argument("--no-chat", action="store_true", help="encode the prompt as is, without the chat template")
    p.add_argument("--log-level", default="WARNING")
    args = p.parse_args(argv)
    if args.nodes is None and args.embedded is None and args.local is None:
        args.nodes = os.environ.get("KVCACHE_NODES")
        if not args.nodes:
            p.error("one of --nodes, --embedded, --local is required (or set KVCACHE_NODES)")
    if args.max_new_tokens < 1:
        p.error("--max-new-tokens must be at least 1")
    return args


@contextlib.contextmanager
def open_store(args: argparse.Namespace):
    if args.embedded is not None:
        with EmbeddedCluster(args.embedded, replication=args.replication) as client:
            yield client
    elif args.local is not None:
        from kvstore.local import LocalStore

        with LocalStore(args.local) as store:
            yield store
    else:
        from kvclient import Client

        with Client(args.nodes, replication=args.replication, timeout=args.timeout, token=args.token,
                    tls_ca=args.tls_ca) as client:
            check_store(client, args.allow_store_down)
            yield client


class StoreDown(RuntimeError):
    """No node of the cluster answered (and --allow-store-down was not given)."""


def check_store(client, allowed: bool) -> None:
    """Fail fast, naming the nodes and why, when no node serves this client (down, or refusing
    its token); a warning with `allowed`. Stat is an authenticated call, unlike health."""
    stats = client.stat()
    if any("error" not in s for s in stats.values()):
        return
    why = "; ".join(s["error"] for s in stats.values())
    if not allowed:
        raise StoreDown(f"no node is usable: unreachable or refused this client ({why}); "
                        f"--allow-store-down generates without reuse")
    log.warning("no node is usable; generating without reuse: %s", why)


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.prompt_file == "-":
        text = sys.stdin.read()
    else:
        with open(args.prompt_file, encoding="utf-8") as f:
            text = f.read()
    model, tokenizer = load_model(args.model, dtype=DTYPES[args.dtype], device=args.device)
    ids = encode_prompt(tokenizer, text, model.config.get_text_config().vocab_size, chat=not args.no_chat)
    if args.prompt_tokens is not None:
        if ids.shape[1] < args.prompt_tokens:
            raise ValueError(f"the prompt has {ids.shape[1]} tokens, fewer than --prompt-tokens {args.prompt_tokens}")
        ids = ids[:, : args.prompt_tokens]
    with open_store(args) as client:
        generator = CachedGenerator(
            model, client, tokenizer, tenant_salt=args.tenant_salt.encode(), block_size=args.block_size, codec=args.codec
        )
        with generator:
            if args.verify:
                report, result = verify(generator, ids, args.max_new_tokens)
                out: dict[str, Any] = report.as_dict()
            else:
                result = generator.generate(ids, args.max_new_tokens, do_sample=False)
                out = {
                    "prompt_tokens": result.prompt_tokens,
                    "cached_tokens": result.cached_tokens,
                    "fetch_seconds": result.fetch_seconds,
                    "prefill_seconds": result.prefill_seconds,
                    "reuse_seconds": result.time_to_first_token,
                }
        out["miss_reasons"] = dict(result.miss_reasons)
        out["fingerprint"] = generator.fingerprint
        out["answer"] = decode_tokens(tokenizer, result.new_tokens.cpu())
    return out


def render(out: dict[str, Any]) -> str:
    lines = [f"answer: {out['answer']!r}"]
    if "exact" in out:
        lines.append(
            f"exact: {out['exact']} ({out['tokens_compared']} tokens), max logit diff {out['max_logit_diff']:.3g}"
        )
        lines.append(
            f"prefill {out['prefill_seconds']:.3f}s, reuse {out['reuse_seconds']:.3f}s "
            f"(fetch {out['fetch_seconds']:.3f}s): {out['speedup']:.1f}x; "
            f"KV {out['kv_bytes'] / 1e6:.1f} MB ({out['kv_bytes_per_token']} B/token)"
        )
    else:
        lines.append(f"fetch {out['fetch_seconds']:.3f}s, prefill {out['prefill_seconds']:.3f}s")
    lines.append(f"cached {out['cached_tokens']} of {out['prompt_tokens']} prompt tokens; misses {out['miss_reasons']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        out = run(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # one readable line, not a traceback
        print(f"kvinfer: error: {type(exc).__name__}: {exc}".splitlines()[0], file=sys.stderr)
        return 1
    print(json.dumps(out, sort_keys=True) if args.json else render(out))
    if out["miss_reasons"].get("store_error") and not args.allow_store_down:
        print("kvinfer: error: the store failed during the request (see miss_reasons); "
              "--allow-store-down accepts that", file=sys.stderr)
        return 1
    return 0 if out.get("exact", True) else 2


if __name__ == "__main__":
    sys.exit(main())
