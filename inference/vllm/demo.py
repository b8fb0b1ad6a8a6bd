"""Demo: vLLM (SmolLM2-135M, CPU) over the store: a publisher engine reads a document once, a fresh
engine answers a new question about it loading the document's KV, against a connector-less engine.

    python -m inference.vllm.demo [--question "..."] [--max-new-tokens 32]

Starts two kvstore nodes on loopback (replication 2, temp dirs) and three vLLM engines, one after
another, each in its own process (~45 s each to start here).
"""

from __future__ import annotations

import argparse
import sys

from ..demo import DOCUMENT_PATH, QUESTION
from ..embedded import EmbeddedCluster
from ..models import ModelUnavailable, smollm2_dir
from . import kv_transfer_config
from .run import Engine

FIRST_QUESTION = "Summarise the document above in one sentence."


def _ids(model_dir: str, text: str) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                         tokenize=True, return_dict=False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m inference.vllm.demo", description=__doc__.splitlines()[0])
    p.add_argument("--question", default=QUESTION)
    p.add_argument("--document", default=DOCUMENT_PATH)
    p.add_argument("--max-new-tokens", type=int, default=32)
    args = p.parse_args(argv)
    try:
        model_dir = smollm2_dir()
    except ModelUnavailable as exc:
        print(f"demo-vllm: {exc}", file=sys.stderr)
        return 1
    with open(args.document, encoding="utf-8") as f:
        document = f.read()
    first = _ids(model_dir, f"{document}\n\nAnswer from the document above.\nQuestion: {FIRST_QUESTION}")
    second = _ids(model_dir, f"{document}\n\nAnswer from the document above.\nQuestion: {args.question}")
    print(f"vLLM on CPU, SmolLM2-135M bf16; the new question's prompt is {len(second)} tokens; 2 nodes, replication 2")
    cluster = EmbeddedCluster(2, replication=2)
    with cluster:
        config = kv_transfer_config(cluster.addresses, replication=2)
        with Engine(model_dir, kv_transfer_config=config) as publisher:
            published = publisher.generate([first], max_tokens=1)
        print(f"publisher: read the document once ({len(first)} tokens, {published['seconds']:.2f} s), its blocks "
              f"went to the store in the background")
        with Engine(model_dir, kv_transfer_config=config) as reader:
            ttft_with = reader.generate([second], max_tokens=1)
            with_store = reader.generate([second], max_tokens=args.max_new_tokens)
    # the reference: vLLM alone, answering from its own prefix cache after a full prefill (the same
    # split of cached and computed tokens as the store hit; in bf16 a full prefill's later tokens
    # may differ from any cached run's, vLLM's own prefix cache included)
    with Engine(model_dir) as plain:
        ttft_without = plain.generate([second], max_tokens=1)
        without = plain.generate([second], max_tokens=args.max_new_tokens)
    hits = ttft_with["outputs"][0]["num_cached_tokens"]
    print(f"fresh engine with the connector: {hits} of {len(second)} prompt tokens loaded from the store, "
          f"first token after {ttft_with['seconds']:.3f} s")
    print(f"engine without a connector:     first token after {ttft_without['seconds']:.3f} s")
    print(f"speedup to first token: {ttft_without['seconds'] / ttft_with['seconds']:.1f}x")
    equal = with_store["outputs"][0]["token_ids"] == without["outputs"][0]["token_ids"]
    print(f"answer: {with_store['outputs'][0]['text'].strip()}")
    print(f"answers token-identical (store KV vs vLLM's own KV, same prefix): {equal}")
    if not equal:
        a, b = with_store["outputs"][0]["token_ids"], without["outputs"][0]["token_ids"]
        first_diff = next(i for i, (x, y) in enumerate(zip(a + [None], b + [None])) if x != y)
        print(f"first differing token: {first_diff}; without: {without['outputs'][0]['text'].strip()}")
    return 0 if equal and hits > 0 else 2


if __name__ == "__main__":
    sys.exit(main())
