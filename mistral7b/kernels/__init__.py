"""Weight-only int8 / int4 (and float) linear layers, with native CPU GEMV kernels for decode.

Why native kernels: decoding one token is a chain of GEMVs (M = 1) that should run at the machine's
memory bandwidth (~31 GB/s with 2 threads here by the issue's figure; a plain AVX2 read loop reached
21-22 GB/s on 2026-11-27), yet with 2 threads (AMD EPYC, AVX2, torch 2.13):
- F.linear (MKL/oneDNN) fp32 reaches ~30 GB/s only on small warm weights; cold or large it falls to
  8-17 GB/s (49152x576: 14 ms, 8 GB/s), and bf16 weights run at 11-14 GB/s. Profiling showed aten::mm
  at ~80 ms of a ~100 ms fp32 SmolLM2-135M token.
- torch's int4 kernel `_weight_int4pack_mm_for_cpu` moves ~6 GB/s (the project's profiling); `_weight_int8pack_mm` wants bf16
  activations and reaches 6-13 GB/s.
So `kernels.cpp` does what llama.cpp does: quantize the activations per 32-block (+ fp32 scale),
dot them with the weight blocks in integers (AVX2 maddubs/madd), scale and accumulate in fp32, rows
split over threads. int4 weights take int8 activations; int8 weights take int16 activations, because
with int8 ones the activations' error dominated the weights' (SmolLM2 perplexity +1.6-2.1% against
+0.2% for int8 G32). Speed per shape: benchmarks/kernels.py.

Paths, by activation rows M = x.numel() // K:
- M <= GEMV_MAX_ROWS (32): the native GEMV (the weight is read once for tiles of 4 rows). Its error
  is that of the quantized activations against dequantize + F.linear: ~0.6% relative (Frobenius)
  for int4, ~2e-5 for int8.
- larger M (prefill, compute-bound): dequantize a tile of weight rows into x.dtype, then matmul
  (`_tiled_linear`); at M = 32..64 the two meet (1 thread, 4096x4096 and 1536x576).
- x on CUDA, x requiring grad (LoRA on a frozen quantized base), MISTRAL7B_NATIVE=0 or no native
  build: dequantize + F.linear in pure torch, which autograd and any device handle.
`float_linear`: bf16 weights take the native GEMV for M <= 32 (it converts bf16 to fp32 in
registers; 1.0-3.8x faster than F.linear bf16 on the SmolLM2 and 7B shapes, same-run A/B with 1 and 2
threads). fp32 weights take it too: in isolated A/Bs on a busy machine MKL's sgemv looked as fast
(0.8-1.5x), but in the whole SmolLM2 fp32 decode on a quiet machine (2 threads) ours gave 19.5
tok/s against F.linear's 13.8 (MKL's per-call cost on 210 small GEMVs a token).

Threads: the GEMVs split rows over torch's threads once each gets >= 32 KB of weights. On a machine
busy with other jobs (load 5-10 on 2 cores), every 2-thread region waits for a descheduled thread:
the 211 int4 GEMVs of a SmolLM2-135M token took 38-150 ms with 2 threads against 18-30 ms with 1
(and 2-thread torch.add regions slowed alike), so there torch.set_num_threads(1) is the better choice.

Decode: `decode_step` runs every transformer block of a decode step in one native call (decode.cpp,
one OpenMP team for all layers, barriers between phases): at SmolLM2's size the per-op costs of the
eager block (Python, dispatch, a thread fork/join per GEMV) were half of a token's time.

All native ops are `torch.ops.mistral7b.*` with fake implementations: torch.compile traces the
wrappers below and calls the ops as extern kernels.

Formats: see `formats.py` (int8 symmetric per group; int4 q * s + m in GGUF Q4_0/Q4_1 block layout).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .formats import dequantize_int4 as _dequantize_int4
from .formats import dequantize_int8 as _dequantize_int8
from .formats import quantize_int4, quantize_int8
from .native import native_available

__all__ = ["quantize_int8", "dequantize_int8", "quantize_int4", "dequantize_int4", "int8_linear",
           "int4_linear", "float_linear", "decode_step_available", "decode_step", "native_available"]

# Most rows (M = x.numel() // K) the quantized GEMV takes; above, dequantize + matmul is faster.
GEMV_MAX_ROWS = 32
# Weights dequantized per matmul on the prefill path: 8 MB of fp32, which stays in L3 for its matmul.
TILE_ELEMENTS = 1 << 21


_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _native(x: Tensor) -> bool:
    """The native ops serve CPU activations of _DTYPES without autograd (gradients come from F.linear)."""
    return (x.is_cpu and x.dtype in _DTYPES and native_available()
            and not (x.requires_grad and torch.is_grad_enabled()))


def _few_rows(x: Tensor) -> bool:
    return x.numel() <= GEMV_MAX_ROWS * x.shape[-1]


def _tiled_linear(x: Tensor, n: int, dequantize_rows) -> Tensor:
    """x [..., K] @ w.T -> [..., N], w dequantized into x.dtype a tile of rows at a time by
    dequantize_rows(n0, n1) -> [n1 - n0, K]: a tile stays in cache for its matmul, and no [N, K] copy
    is allocated (a fresh large allocation page-faults on every call)."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    out_t = x2.new_empty(n, x2.shape[0])  # y.T: each tile's rows are contiguous there
    tile = max(1, TILE_ELEMENTS // k)
    for n0 in range(0, n, tile):
        torch.mm(dequantize_rows(n0, n0 + tile), x2.T, out=out_t[n0:n0 + tile])
    return out_t.T.contiguous().view(*x.shape[:-1], n)


def dequantize_int8(qweight: Tensor, scales: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """int8 qweight [N, K], scales [N, K // G] -> w [N, K] in dtype."""
    if qweight.is_cpu and dtype in _DTYPES and native_available():
        return torch.ops.mistral7b.dequantize_int8(qweight, scales, dtype)
    return _dequantize_int8(qweight, scales, dtype)


def dequantize_int4(qweight: Tensor, scales: Tensor, mins: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """uint8 qweight [N, K // 2], scales and mins [N, K // G] -> w [N, K] in dtype."""
    if qweight.is_cpu and dtype in _DTYPES and native_available():
        return torch.ops.mistral7b.dequantize_int4(qweight, scales, mins, dtype)
    return _dequantize_int4(qweight, scales, mins, dtype)


def int8_linear(x: Tensor, qweight: Tensor, scales: Tensor) -> Tensor:
    """x [..., K] @ w.T -> [..., N] in x.dtype, w = dequantize_int8(qweight, scales)."""
    if not _native(x):
        return F.linear(x, dequantize_int8(qweight, scales, x.dtype))
    if _few_rows(x):
        return torch.ops.mistral7b.int8_gemv(x, qweight, scales)
    return _tiled_linear(x, qweight.shape[0], lambda a, b: torch.ops.mistral7b.dequantize_int8(
        qweight[a:b], scales[a:b], x.dtype))


def int4_linear(x: Tensor, qweight: Tensor, scales: Tensor, mins: Tensor) -> Tensor:
    """x [..., K] @ w.T -> [..., N] in x.dtype, w = dequantize_int4(qweight, scales, mins)."""
    if not _native(x):
        return F.linear(x, dequantize_int4(qweight, scales, mins, x.dtype))
    if _few_rows(x):
        return torch.ops.mistral7b.int4_gemv(x, qweight, scales, mins)
    return _tiled_linear(x, qweight.shape[0], lambda a, b: torch.ops.mistral7b.dequantize_int4(
        qweight[a:b], scales[a:b], mins[a:b], x.dtype))


def float_linear(x: Tensor, weight: Tensor) -> Tensor:
    """x [..., K] @ weight.T for fp32 or bf16 weight [N, K] -> [..., N] in x.dtype."""
    if weight.dtype in (torch.bfloat16, torch.float32) and _native(x) and _few_rows(x):
        return torch.ops.mistral7b.float_gemv(x, weight)
    return F.linear(x, weight.to(x.dtype))


def decode_step_available(x: Tensor, cache: Tensor) -> bool:
    """Whether `decode_step` can run for activations x [B, dim] (any number of rows: each is computed
    on its own, so the runner sends every row of a step there) and a cache tensor."""
    return _native(x) and cache.is_cpu and cache.dtype in _DTYPES


def decode_step(h: Tensor, weights: list[Tensor], linear_sizes: list[int], eps: float, n_heads: int,
                n_kv_heads: int, k_cache: Tensor, v_cache: Tensor, write_dst: Tensor, used: int,
                mask: Tensor | None, positions: Tensor, rope_theta: float, final_norm: Tensor | None = None,
                slots: Tensor | None = None) -> Tensor:
    """Every transformer block of a decode step in one native call (decode.cpp): h [B, dim] -> [B, dim],
    RMSNorm-ed by final_norm [dim] when given.

    weights, per layer: attention_norm, ffn_norm, then the tensors of the fused qkv, wo, fused
    gate_up and down projections, each [weight] (fp32/bf16), [qweight, scales] (int8) or
    [qweight, scales, mins] (int4); linear_sizes [4 * layers] says how many tensors each has.
    k_cache, v_cache [layers, rows, S, n_kv_heads, head_dim] receive the new keys/values at flat
    slots write_dst [B] (row * S + slot); attention reads slots [0, used) of each row where
    mask [B, used] allows (None: all). positions [B] and rope_theta give each token's RoPE rotation.
    slots [B, used] (a paged cache [layers, blocks, block_size, n_kv_heads, head_dim]): the flat slot
    index of each row's slot j, which then need not be row * S + j.
    """
    return torch.ops.mistral7b.decode_step(h, weights, linear_sizes, eps, n_heads, n_kv_heads, k_cache, v_cache,
                                           write_dst, used, mask, positions, rope_theta, final_norm, slots)
