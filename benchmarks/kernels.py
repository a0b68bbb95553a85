"""GEMV speed of mistral7b.kernels against torch's own CPU paths, at batch 1 (decode).

    python benchmarks/kernels.py                 # M = 1, SmolLM2-135M and Mistral-7B shapes
    python benchmarks/kernels.py --rows 1,4,16,64 --shapes 1536x576,4096x4096   # GEMV vs dequantize + matmul

Weights are cold, as in a real decode step that streams every layer once: each call uses the next of
enough copies to overflow the 32 MiB L3. GB/s = weight bytes read (scales and mins included) / time.
Each number is the best of 5 rounds.

Results: `--threads 2`, AMD EPYC (AVX2, 32 MiB L3), torch 2.13, 2026-11-27, quiet machine (load ~1;
a hand-written AVX2 read loop reached 21-22 GB/s that hour). Cells: us per call, GB/s; the SmolLM2
rows and the Mistral rows come from two runs a few minutes apart (this VM drifts by up to 1.5x).
These are per-op calls, each its own parallel region; a decode step runs them all inside one
(`kernels.decode_step`), where the per-call costs of the small SmolLM2 shapes mostly vanish.

| shape (NxK) | F.linear fp32 | F.linear bf16 | int8pack_mm bf16 | ours int8 | ours int4 G32 | ours float fp32 | ours float bf16 |
| --- | --- | --- | --- | --- | --- | --- | --- |
| 576x576 | 151 us 8.8 | 66 us 10.1 | 70 us 4.8 | 30 us 11.0 | 36 us 5.8 | 104 us 12.7 | 53 us 12.4 |
| 192x576 | 69 us 6.4 | 36 us 6.2 | 36 us 3.1 | 19 us 6.0 | 19 us 3.7 | 35 us 12.5 | 24 us 9.4 |
| 1536x576 | 385 us 9.2 | 165 us 10.8 | 146 us 6.1 | 63 us 14.2 | 50 us 11.0 | 245 us 14.4 | 106 us 16.7 |
| 576x1536 | 300 us 11.8 | 164 us 10.8 | 116 us 7.7 | 65 us 13.7 | 46 us 12.0 | 203 us 17.5 | 113 us 15.6 |
| 49152x576 | 12242 us 9.3 | 4856 us 11.7 | 5064 us 5.6 | 1879 us 15.2 | 1249 us 14.2 | 7233 us 15.7 | 4087 us 13.9 |
| 4096x4096 | 5017 us 13.4 | 3860 us 8.7 | 1602 us 10.5 | 1125 us 14.9 | 723 us 14.5 | 5284 us 12.7 | 2213 us 15.2 |
| 1024x4096 | 1607 us 10.4 | 817 us 10.3 | 461 us 9.1 | 337 us 12.5 | 228 us 11.5 | 1572 us 10.7 | 579 us 14.5 |
| 14336x4096 | 19362 us 12.1 | 11373 us 10.3 | 5874 us 10.0 | 4248 us 13.8 | 2475 us 14.8 | 16168 us 14.5 | 7640 us 15.4 |
| 4096x14336 | 16089 us 14.6 | 9222 us 12.7 | 4499 us 13.1 | 4428 us 13.3 | 2896 us 12.7 | 15602 us 15.1 | 7175 us 16.4 |

SmolLM2-135M token, GEMVs only (same run as its rows): F.linear fp32 57.5 ms, F.linear bf16 25.7 ms,
int8pack_mm 23.6 ms, ours float fp32 36.4 ms, ours float bf16 18.5 ms, ours int8 10.5 ms, ours int4
8.9 ms. int4 at K = 576 is compute-bound (18 blocks of 32 a row: the per-row work of the group terms
and the final sum is a sixth of it), at K = 4096 and 14336 bandwidth-bound.
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
