"""Demo: ask SmolLM2 about a ~2,000-token document twice; the second time its KV comes from the store.

    python -m inference.demo [--question "..."] [--max-new-tokens 48] [--tiny]

Starts two kvstore nodes on loopback (replication 2, temp dirs) inside this process.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from .embedded import EmbeddedCluster
from .generator import CachedGenerator
from .models import ModelUnavailable, decode_tokens, encode_prompt, load_model
from .verify import plain_generate, warm_up

DOCUMENT_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "document.txt")
QUESTION = "What must an operator do when a single filter's effluent turbidity stays above 0.15 NTU?"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m inference.demo", description=__doc__)
    p.add_argument("--question", default=QUESTION)
    p.add_argument("--document", default=DOCUMENT_PATH)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--tiny", action="store_true", help="use the tiny random Qwen3 (no SmolLM2 needed)")
    args = p.parse_args(argv)

    with open(args.document, encoding="utf-8") as f:
        document = f.read()
    try:
        model, tokenizer = load_model("tiny-qwen3" if args.tiny else "smollm2")
    except ModelUnavailable as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    prompt = f"{document}\n\nAnswer from the document above.\nQuestion: {args.question}"
    ids = encode_prompt(tokenizer, prompt, model.config.vocab_size)
    print(f"model {type(model).__name__}, prompt {ids.shape[1]} tokens, 2 nodes, replication 2")

    with EmbeddedCluster(2, replication=2) as client, CachedGenerator(model, client, tokenizer) as generator:
        warm_up(model, ids)
        plain = plain_generate(model, ids, args.max_new_tokens, do_sample=False)
        first = generator.generate(ids, args.max_new_tokens, do_sample=False)
        generator.flush()  # the write-behind publish of the first answer's blocks
        second = generator.generate(ids, args.max_new_tokens, do_sample=False)
        paths = dict(client.reads)

    reuse = second.fetch_seconds + second.prefill_seconds
    per_token = generator.layout.bytes_per_token
    identical = torch.equal(first.sequences, second.sequences) and torch.equal(first.sequences, plain.sequences)
    print(f"1st ask: prefilled {first.prefilled_tokens} tokens, first token after {first.prefill_seconds:.3f} s")
    print(f"2nd ask: {second.cached_tokens} tokens from the store in {second.fetch_seconds:.3f} s "
          f"({second.fetched_bytes / 1e6:.1f} MB), prefilled {second.prefilled_tokens}, "
          f"first token after {reuse:.3f} s")
    print(f"read path: {paths['colocated']} records from the nodes' LMDB maps (co-located), "
          f"{paths['remote']} over the network")
    print(f"speedup to first token: {first.prefill_seconds / reuse:.1f}x")
    print(f"KV size: {per_token * ids.shape[1] / 1e6:.1f} MB for {ids.shape[1]} tokens ({per_token} bytes/token)")
    print(f"answer: {decode_tokens(tokenizer, second.new_tokens).strip()}")
    print(f"answers token-identical (plain generate, 1st, 2nd): {identical}")
    return 0 if identical else 2


if __name__ == "__main__":
    sys.exit(main())
