"""Decode speed with the KV cache in fp16 (the quantized models' default) against fp32, at a long context.

    python benchmarks/kv_cache_dtype.py [--model PATH] [--quantize int4] [--context 1024] [--tokens 32] [--rounds 5]

One process, one model: a cache of each dtype is pre-filled with the same `--context` random tokens,
then the two decode `--tokens` tokens each in alternation for `--rounds` rounds, so that both see the
same machine (this VM's speed drifts by up to 1.5x within minutes). Prints ms per token per round and
the fp32 / fp16 time ratio of each round. A decode step reads every cached position's keys and values:
2 x layers x kv heads x head_dim values each, 46 KB in fp32 for SmolLM2-135M.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import mistral7b
from mistral7b.runner import Runner


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint (default: the built-in SmolLM2-135M-Instruct)")
    p.add_argument("--quantize", choices=("int8", "int4"), default="int4")
    p.add_argument("--context", type=int, default=1024, help="cached positions before decoding (default: 1024)")
    p.add_argument("--tokens", type=int, default=32, help="tokens decoded per round and cache (default: 32)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    model = mistral7b.load(args.model, quantize=args.quantize)
    runner = Runner(model)
    prompt = torch.randint(0, model.args.vocab_size, (args.context,), generator=torch.Generator().manual_seed(0))
    caches = {}
    with torch.inference_mode():
        for dtype in (torch.float16, torch.float32):
            model.kv_cache_dtype = dtype
            cache = model.new_cache(1, args.context + args.rounds * args.tokens + 1)
            runner(prompt, [args.context], cache, output_rows=torch.tensor([args.context - 1]))
            caches[dtype] = cache
        times: dict[torch.dtype, list[float]] = {dtype: [] for dtype in caches}
        token = torch.tensor([5])
        for _ in range(args.rounds):
            for dtype, cache in caches.items():
                start = time.perf_counter()
                for _ in range(args.tokens):
                    runner(token, [1], cache)
                times[dtype].append((time.perf_counter() - start) / args.tokens * 1e3)
    print(f"{args.quantize}, {args.context} cached positions, {args.threads} threads, ms per decoded token:")
    for dtype, ms in times.items():
        print(f"  {str(dtype):14s} median {statistics.median(ms):6.2f}  rounds {', '.join(f'{t:.2f}' for t in ms)}")
    ratios = [b / a for a, b in zip(times[torch.float16], times[torch.float32])]
    print(f"  fp32 / fp16: median {statistics.median(ratios):.2f}x, rounds {', '.join(f'{r:.2f}' for r in ratios)}")


if __name__ == "__main__":
    main()
