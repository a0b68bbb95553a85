"""GEMV speed of mistral7b.kernels against torch's own CPU paths, at batch 1 (decode).

    python benchmarks/kernels.py                 # M = 1, SmolLM2-135M and Mistral-7B shapes
    python benchmarks/kernels.py --rows 1,4,16,64 --shapes 1536x576,4096x4096   # GEMV vs dequantize + matmul

Weights are cold, as in a real decode step that streams every layer once: each call uses the next of
enough copies to overflow the 32 MiB L3. GB/s = weight bytes read (scales and mins included) / time.
Each number is the best of 5 rounds.

Preliminary results, to be re-run on a quiet machine: `--threads 1`, AMD EPYC (AVX2), torch 2.13,
2026-11-27, while other jobs held the load average at 9-11 on the 2 cores and saturated memory:
absolute numbers are ~10x below this machine's (31 GB/s); only the ratios within a row mean much.
A 2-thread run under that load was meaningless (every parallel region waits for a descheduled
thread). Cells: us per call, GB/s.

| shape (NxK) | F.linear fp32 | F.linear bf16 | int8pack_mm bf16 | ours int8 | ours int4 G32 | ours float fp32 | ours float bf16 |
| --- | --- | --- | --- | --- | --- | --- | --- |
| 576x576 | 468 us 2.8 | 345 us 1.9 | 347 us 1.0 | 179 us 1.9 | 116 us 2.1 | 484 us 2.7 | 211 us 3.1 |
| 192x576 | 146 us 3.0 | 133 us 1.7 | 90 us 1.2 | 50 us 2.2 | 57 us 1.5 | 198 us 2.2 | 103 us 2.1 |
| 1536x576 | 1848 us 1.9 | 1074 us 1.6 | 996 us 0.9 | 335 us 2.7 | 216 us 3.1 | 866 us 4.1 | 488 us 3.6 |
| 576x1536 | 706 us 5.0 | 754 us 2.3 | 550 us 1.6 | 346 us 2.6 | 215 us 3.1 | 1008 us 3.5 | 580 us 3.0 |
| 49152x576 | 34955 us 3.2 | 26427 us 2.1 | 63676 us 0.4 | 16820 us 1.7 | 16265 us 1.3 | 75054 us 1.5 | 46752 us 1.2 |
| 4096x4096 | 30099 us 2.2 | 22634 us 1.5 | 13577 us 1.2 | 7882 us 2.1 | 8060 us 1.6 | 31095 us 2.2 | 14141 us 2.4 |
| 1024x4096 | 6153 us 2.7 | 5849 us 1.4 | 2964 us 1.4 | 2009 us 2.1 | 1816 us 1.7 | 13796 us 1.2 | 8042 us 1.0 |
| 14336x4096 | 133571 us 1.8 | 85245 us 1.4 | 95601 us 0.6 | 36890 us 1.6 | 13847 us 3.2 | 48518 us 4.8 | 31988 us 3.7 |
| 4096x14336 | 37890 us 6.2 | 45316 us 2.6 | 15232 us 3.9 | 14809 us 4.0 | 15752 us 2.8 | 61518 us 3.8 | 30168 us 3.9 |

SmolLM2-135M token, GEMVs only, from the same run: F.linear fp32 204 ms, F.linear bf16 142 ms,
int8pack_mm 166 ms, ours int8 61 ms, ours int4 46 ms, ours float bf16 112 ms (target on a quiet
machine: int4 under ~6 ms).
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

from mistral7b import kernels

SMOLLM2 = [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)]
MISTRAL = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]
SMOLLM2_TOKEN = {(576, 576): 60, (192, 576): 60, (1536, 576): 60, (576, 1536): 30, (49152, 576): 1}  # calls
POOL_BYTES = 96 << 20  # > 3x L3


def methods(n: int, k: int) -> dict[str, tuple[int, callable]]:
    """name -> (weight bytes, make(w) -> fn(x))."""
    return {
        "F.linear fp32": (4 * n * k, lambda w: (lambda x: F.linear(x, w))),
        "F.linear bf16": (2 * n * k, lambda w: (lambda x, w=w.bfloat16(): F.linear(x.bfloat16(), w))),
        "int8pack_mm bf16": (n * k + 2 * n, lambda w: _int8pack(w)),
        "ours int8": (n * k + 4 * n, lambda w: _ours_int8(w)),
        "ours int4 G32": (n * k // 2 + 4 * n * k // 32, lambda w: _ours_int4(w)),  # fp16 scales and mins
        "ours float fp32": (4 * n * k, lambda w: (lambda x: torch.ops.mistral7b.float_gemv(x, w))),
        "ours float bf16": (2 * n * k, lambda w: (lambda x, w=w.bfloat16(): kernels.float_linear(x, w))),
    }


def _int8pack(w):
    q, s = kernels.quantize_int8(w)
    s = s[:, 0].bfloat16()
    return lambda x: torch.ops.aten._weight_int8pack_mm(x.bfloat16(), q, s)


def _ours_int8(w):
    q, s = kernels.quantize_int8(w)
    return lambda x: kernels.int8_linear(x, q, s)


def _ours_int4(w):
    q, s, m = kernels.quantize_int4(w)
    return lambda x: kernels.int4_linear(x, q, s, m)


def bench(fns: list, x: torch.Tensor, rounds: int = 5, seconds: float = 0.1) -> float:
    """Best mean seconds per call over rounds, cycling through fns (one per weight copy)."""
    for f in fns:
        f(x)
    calls = max(len(fns), int(seconds / _time(fns, x, len(fns)) * len(fns)))
    return min(_time(fns, x, calls) for _ in range(rounds)) / calls


def _time(fns, x, calls):
    start = time.perf_counter()
    for i in range(calls):
        fns[i % len(fns)](x)
    return time.perf_counter() - start


def table(shapes, rows: int) -> dict:
    results = {}
    for n, k in shapes:
        x = torch.randn(rows, k)
        for name, (nbytes, make) in methods(n, k).items():
            copies = max(2, min(4096, math.ceil(POOL_BYTES / nbytes)))
            fns = [make(torch.randn(n, k) / math.sqrt(k)) for _ in range(copies)]
            t = bench(fns, x)
            results[(n, k, name)] = t
            print(f"{n:>6}x{k:<6} M={rows:<3} {name:<18} {t * 1e6:9.1f} us {nbytes / t / 1e9:6.1f} GB/s", flush=True)
            del fns
    return results


def crossover(shapes, rows_list):
    """GEMV kernel vs dequantize + F.linear at each M: where should GEMV_MAX_ROWS be?"""
    for n, k in shapes:
        w = torch.randn(n, k) / math.sqrt(k)
        q4, s4, m4 = kernels.quantize_int4(w)
        q8, s8 = kernels.quantize_int8(w)
        cases = {
            "int4 gemv": lambda x: torch.ops.mistral7b.int4_gemv(x, q4, s4, m4),
            "int4 deq+mm": lambda x: F.linear(x, kernels.dequantize_int4(q4, s4, m4)),
            "int8 gemv": lambda x: torch.ops.mistral7b.int8_gemv(x, q8, s8),
            "int8 deq+mm": lambda x: F.linear(x, kernels.dequantize_int8(q8, s8)),
            "float gemv": lambda x: torch.ops.mistral7b.float_gemv(x, w),
            "F.linear": lambda x: F.linear(x, w),
        }
        for rows in rows_list:
            x = torch.randn(rows, k)
            line = "  ".join(f"{name} {bench([f], x, rounds=3) * 1e6:8.1f}" for name, f in cases.items())
            print(f"{n:>6}x{k:<6} M={rows:<3} us: {line}", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", help="comma-separated M values: compare GEMV with dequantize + matmul")
    p.add_argument("--shapes", help="comma-separated NxK (default: all)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    assert kernels.native_available(), "native kernels unavailable"
    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")] if args.shapes else SMOLLM2 + MISTRAL
    if args.rows:
        crossover(shapes, [int(r) for r in args.rows.split(",")])
        return
    results = table(shapes, 1)
    names = {name for (_, _, name) in results}
    if all(s in shapes for s in SMOLLM2_TOKEN):
        print("SmolLM2-135M token, GEMVs only (30 layers x 7 linears + output):")
        for name in sorted(names):
            ms = sum(calls * results[(n, k, name)] for (n, k), calls in SMOLLM2_TOKEN.items()) * 1e3
            print(f"  {name:<18} {ms:6.2f} ms")


if __name__ == "__main__":
    main()
