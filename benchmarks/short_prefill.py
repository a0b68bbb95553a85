"""Pre-fill time of one short sequence through the KV cache (the engine's path for one prompt or chat turn).

    python benchmarks/short_prefill.py [--model PATH] [--configs int4,bf16,fp32] [--tokens 8,16,32,40,64,128]

For each config, each prompt length: the best of 5 pre-fills of a fresh cache row, logits of the last
position only, 2 threads by default, cut into chunks as the engine cuts a lone prompt: up to 32
tokens a chunk runs as rows of the native decode step, longer prompts (to 128 tokens, 64 with fp32
weights) as consecutive such chunks (`Runner.preferred_chunk`, mistral7b/runner.py).
"""

from __future__ import annotations

import argparse
import time

import torch

import mistral7b
from mistral7b.runner import Runner


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint (default: the built-in SmolLM2-135M-Instruct)")
    p.add_argument("--configs", default="int4,bf16,fp32", help="comma-separated: fp32, bf16, int8, int4")
    p.add_argument("--tokens", default="8,16,32,40,64,128", help="comma-separated prompt lengths")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    lengths = [int(n) for n in args.tokens.split(",")]
    print(f"{args.threads} threads, ms per pre-fill (best of 5)")
    print("config  " + "".join(f"{n:>9d}" for n in lengths))
    for config in args.configs.split(","):
        kwargs = {"quantize": config} if config.startswith("int") else {"dtype": config}
        runner = Runner(mistral7b.load(args.model, **kwargs))
        cache = runner.new_cache(1, max(lengths))
        cells = []
        for n in lengths:
            ids = torch.randint(0, runner.args.vocab_size, (n,), generator=torch.Generator().manual_seed(n))

            def prefill() -> float:
                cache.reset()
                start = time.perf_counter()
                with torch.inference_mode():
                    fed = 0
                    while fed < n:
                        k = runner.preferred_chunk(cache, 0, n - fed) or n - fed
                        runner(ids[fed:fed + k], [k], cache, output_rows=torch.tensor([k - 1]))
                        fed += k
                return time.perf_counter() - start

            prefill()
            cells.append(min(prefill() for _ in range(5)) * 1e3)
        print(f"{config:8s}" + "".join(f"{ms:9.1f}" for ms in cells))


if __name__ == "__main__":
    main()
