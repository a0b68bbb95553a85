"""A 7B-shaped model (Mistral 7B v0.1's real shapes, random int4 weights) decoding on this machine.

    python benchmarks/seven_b.py [--mode int4|int8] [--tokens 16] [--threads 2]

The weights are random packed values (no fp32 copy is ever made: 7.2B fp32 parameters would need
29 GB), so the numbers say what the int4 path costs at real shapes, not what it answers. Prints
decode tok/s at batch 1, peak RSS, the bytes read per token and the bandwidth limit
(measured read bandwidth / bytes per token).
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
from torch import nn

import mistral7b
from mistral7b.bench.measure import measure_bandwidth
from mistral7b.quant import Int4Linear, Int8Linear, QuantLinear
from mistral7b.runner import Runner


def random_quantized(model: mistral7b.Transformer, mode: str) -> mistral7b.Transformer:
    """Fill a meta-device model: every linear a random int4/int8 layer, embedding and norms real."""
    gen = torch.Generator().manual_seed(0)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                n, k = child.out_features, child.in_features
                if mode == "int4":
                    scales = torch.full((n, k // 32), 0.002, dtype=torch.float16)  # as quantize_int4 makes them
                    layer = Int4Linear(torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=gen),
                                       scales, -8 * scales)
                else:
                    layer = Int8Linear(torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen),
                                       torch.full((n, 1), 2e-4))
                setattr(parent, name, layer)
    model.tok_embeddings.weight = nn.Parameter(torch.randn(model.args.vocab_size, model.args.dim, generator=gen) * 0.02,
                                               requires_grad=False)
    for module in model.modules():
        if isinstance(module, mistral7b.model.RMSNorm):
            module.weight = nn.Parameter(torch.ones(module.weight.shape), requires_grad=False)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("int4", "int8"), default="int4")
    parser.add_argument("--tokens", type=int, default=16, help="decode steps timed (after 4 of warm-up)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bandwidth = measure_bandwidth(args.threads, 1 << 30)

    margs = mistral7b.PRESETS["mistral-7b-v0.1"]
    with torch.device("meta"):
        model = mistral7b.Transformer(margs)
    start = time.perf_counter()
    model = random_quantized(model, args.mode)
    runner = Runner(model)
    built = time.perf_counter() - start
    weight_bytes = sum(m.weight_bytes for m in model.modules() if isinstance(m, QuantLinear))
    per_token = weight_bytes + margs.dim * 4  # every linear once, one embedding row

    cache = model.new_cache(1)
    prompt = torch.randint(0, margs.vocab_size, (16,))
    with torch.inference_mode():
        runner(prompt, [16], cache)
        token = torch.tensor([1])
        for _ in range(4):
            runner(token, [1], cache)
        start = time.perf_counter()
        for _ in range(args.tokens):
            runner(token, [1], cache)
        seconds = time.perf_counter() - start
    tok_s = args.tokens / seconds
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    print(f"Mistral-7B-shaped, {args.mode}, {args.threads} threads (built in {built:.0f} s)")
    print(f"| decode tok/s (batch 1) | peak RSS | {args.mode} weights | GB read per token | measured bandwidth "
          f"| bandwidth limit | % of limit |\n|---|---|---|---|---|---|---|")
    limit = bandwidth * 1e9 / per_token
    print(f"| {tok_s:.2f} | {peak:.2f} GiB | {weight_bytes / 2**30:.2f} GiB | {per_token / 1e9:.2f} | "
          f"{bandwidth:.1f} GB/s | {limit:.2f} tok/s | {100 * tok_s / limit:.0f}% |")


if __name__ == "__main__":
    main()
