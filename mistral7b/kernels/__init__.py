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


def _native(x: Tensor) -> bool:
    """The native ops serve CPU tensors without autograd (their gradients come from F.linear)."""
    return x.device.type == "cpu" and not (x.requires_grad and torch.is_grad_enabled()) and native_available()


def _rows(x: Tensor) -> int:
    return x.numel() // max(x.shape[-1], 1)


def dequantize_int8(qweight: Tensor, scales: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """int8 qweight [N, K], scales [N, K // G] -> w [N, K] in dtype."""
    if qweight.device.type == "cpu" and native_available():
        return torch.ops.mistral7b.dequantize_int8(qweight, scales, dtype)
    return _dequantize_int8(qweight, scales, dtype)


def dequantize_int4(qweight: Tensor, scales: Tensor, mins: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """uint8 qweight [N, K // 2], scales and mins [N, K // G] -> w [N, K] in dtype."""
    if qweight.device.type == "cpu" and native_available():
        return torch.ops.mistral7b.dequantize_int4(qweight, scales, mins, dtype)
    return _dequantize_int4(qweight, scales, mins, dtype)


def int8_linear(x: Tensor, qweight: Tensor, scales: Tensor) -> Tensor:
    """x [..., K] @ w.T -> [..., N] in x.dtype, w = dequantize_int8(qweight, scales)."""
    if _native(x) and _rows(x) <= GEMV_MAX_ROWS:
        return torch.ops.mistral7b.int8_gemv(x, qweight, scales)
    return F.linear(x, dequantize_int8(qweight, scales, x.dtype))


def int4_linear(x: Tensor, qweight: Tensor, scales: Tensor, mins: Tensor) -> Tensor:
    """x [..., K] @ w.T -> [..., N] in x.dtype, w = dequantize_int4(qweight, scales, mins)."""
    if _native(x) and _rows(x) <= GEMV_MAX_ROWS:
        return torch.ops.mistral7b.int4_gemv(x, qweight, scales, mins)
    return F.linear(x, dequantize_int4(qweight, scales, mins, x.dtype))


def float_linear(x: Tensor, weight: Tensor) -> Tensor:
    """x [..., K] @ weight.T for fp32 or bf16 weight [N, K] -> [..., N] in x.dtype."""
    if _native(x) and _rows(x) <= GEMV_MAX_ROWS and weight.dtype in (torch.float32, torch.bfloat16):
        return torch.ops.mistral7b.float_gemv(x, weight)
    return F.linear(x, weight.to(x.dtype))
