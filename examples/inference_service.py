"""An inference service's use of the store: generate with KV reuse, then again with reuse.

    KVCACHE_NODES=127.0.0.1:7070,127.0.0.1:7071 python examples/inference_service.py [--model smollm2]

The first request for a prompt prefills it and publishes its KV blocks in the background; the
second finds them in the store and computes only what is new. Model names: inference.MODEL_NAMES
(tiny-qwen3 needs no download: random weights, UTF-8 bytes as tokens).
"""

from __future__ import annotations

import argparse
import os
import sys

from inference import CachedGenerator, load_model
from kvclient import Client


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", default=os.environ.get("KVCACHE_NODES", "127.0.0.1:7070,127.0.0.1:7071"))
    p.add_argument("--model", default="tiny-qwen3")
    p.add_argument("--prompt", default="Summarise the plant's chlorine contact rules. " * 10)
    args = p.parse_args(argv)
    model, tokenizer = load_model(args.model)
    with Client(args.nodes, timeout=2.0) as kv, CachedGenerator(model, kv, tokenizer, block_size=64) as gen:
        for attempt in ("first", "second"):
            result = gen.generate(args.prompt, max_new_tokens=8, do_sample=False)
            print(f"{attempt}: {result.cached_tokens}/{result.prompt_tokens} prompt tokens from the store, "
                  f"time to first token {result.time_to_first_token * 1000:.0f} ms, misses {dict(result.miss_reasons)}")
            gen.flush()  # the first request's blocks are stored before the second asks for them
    return 0


if __name__ == "__main__":
    sys.exit(main())
