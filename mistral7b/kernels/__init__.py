"""Weight-only int8 / int4 (and float) linear layers with native CPU GEMV kernels for decode.

Why: (measurements filled in below)

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
           "int4_linear", "float_linear", "native_available"]

# Most rows (M = x.numel() // K) the quantized GEMV takes; above, dequantize + matmul is faster.
GEMV_MAX_ROWS = 16
# Weights dequantized per matmul on the prefill path: 8 MB of fp32, which stays in L3 for its matmul.
TILE_ELEMENTS = 1 << 21


def _native(x: Tensor) -> bool:
    """The native ops serve CPU activations without autograd (gradients come from F.linear)."""
    return x.is_cpu and native_available() and not (x.requires_grad and torch.is_grad_enabled())


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
    if qweight.is_cpu and native_available():
        return torch.ops.mistral7b.dequantize_int8(qweight, scales, dtype)
    return _dequantize_int8(qweight, scales, dtype)


def dequantize_int4(qweight: Tensor, scales: Tensor, mins: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """uint8 qweight [N, K // 2], scales and mins [N, K // G] -> w [N, K] in dtype."""
    if qweight.is_cpu and native_available():
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
    if _native(x) and _few_rows(x) and weight.dtype in (torch.float32, torch.bfloat16):
        return torch.ops.mistral7b.float_gemv(x, weight)
    return F.linear(x, weight.to(x.dtype))
