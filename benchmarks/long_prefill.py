"""Pre-fill speed of one long prompt alone (the time to the first token of an uncached prompt).

    python benchmarks/long_prefill.py [--lengths 512,1024] [--configs int4,fp32]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import mistral7b
from mistral7b.engine import Engine, Request
from mistral7b.sampling import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="512,1024")
    ap.add_argument("--configs", default="int4,fp32")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    for config in args.configs.split(","):
        model = mistral7b.load(None, quantize=None if config == "fp32" else config)
        for n in map(int, args.lengths.split(",")):
            ids = torch.randint(100, 40000, (n,), generator=torch.Generator().manual_seed(0)).tolist()
            seconds = []
            for _ in range(args.rounds):
                engine = Engine(model, None, max_num_seqs=1, max_model_len=n + 1, prefix_caching=False)
                engine.add_request(Request(ids, SamplingParams(max_tokens=1)))
                start = time.perf_counter()
                while engine.has_work:
                    engine.step()
                seconds.append(time.perf_counter() - start)
            print(f"{config} {n} tokens: {n / statistics.median(seconds):.0f} tok/s", flush=True)


if __name__ == "__main__":
    main()
