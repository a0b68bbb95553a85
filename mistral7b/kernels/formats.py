"""The int8 and int4 weight formats, in pure torch: quantize, and the reference dequantize.

int8: qweight int8 [N, K], scales fp32 [N, K // G]; w = q * s, q in -127..127 (symmetric).
int4: qweight uint8 [N, K // 2], scales and mins fp16 [N, K // G] (as GGUF's Q4_1; fp32 is accepted
      too: GGUF Q4_K's products d * sc need it); w = q * s + m in fp32, q in 0..15. Each
      32-weight block is 16 bytes laid out as GGUF's Q4_0/Q4_1: byte j holds weight j in its low
      nibble and weight j + 16 in its high nibble, so those GGUF types (and Q4_K) load without loss.
G (the group size) is a multiple of 32 that divides K.
"""

from __future__ import annotations

import torch
from torch import Tensor

BLOCK = 32  # weights per packed int4 block


def _groups(w: Tensor, group_size: int) -> Tensor:
    n, k = w.shape
    if group_size % BLOCK or k % group_size:
        raise ValueError(f"group size {group_size} must be a multiple of {BLOCK} dividing K = {k}")
    return w.float().reshape(n, k // group_size, group_size)


def quantize_int8(w: Tensor, group_size: int | None = None) -> tuple[Tensor, Tensor]:
    """w [N, K] -> (qweight int8 [N, K], scales fp32 [N, K // G]); G defaults to K (per channel)."""
    g = _groups(w, group_size or w.shape[1])  # [N, K/G, G]
    scales = g.abs().amax(-1) / 127
    inv = torch.where(scales > 0, 1 / scales, 0)
    q = torch.round(g * inv[..., None]).clamp(-127, 127).to(torch.int8)
    return q.reshape(w.shape), scales


def dequantize_int8(qweight: Tensor, scales: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """-> w [N, K] in dtype."""
    n, k = qweight.shape
    g = qweight.reshape(n, scales.shape[1], -1).float() * scales[..., None].float()
    return g.reshape(n, k).to(dtype)


def quantize_int4(w: Tensor, group_size: int = 32) -> tuple[Tensor, Tensor, Tensor]:
    """w [N, K] -> (qweight uint8 [N, K // 2], scales, mins fp16 [N, K // G]): per group, min..max
    in 16 steps, rounded to nearest against the fp16-rounded scale and min. fp16 rather than fp32
    scales: 20 instead of 24 bytes per 32 weights, which decode reads every token."""
    g = _groups(w, group_size)
    mins = g.amin(-1).half()
    scales = ((g.amax(-1) - mins.float()) / 15).half()
    inv = torch.where(scales > 0, 1 / scales.float(), 0)
    q = torch.round((g - mins[..., None].float()) * inv[..., None]).clamp(0, 15).to(torch.uint8)
    blocks = q.reshape(w.shape[0], -1, 2, BLOCK // 2)  # [N, K/32, (low, high), 16]
    packed = blocks[:, :, 0] | (blocks[:, :, 1] << 4)
    return packed.reshape(w.shape[0], -1), scales, mins


def dequantize_int4(qweight: Tensor, scales: Tensor, mins: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """-> w [N, K] in dtype."""
    n = qweight.shape[0]
    packed = qweight.reshape(n, -1, 1, BLOCK // 2)  # [N, K/32, 1, 16]
    q = torch.cat([packed & 15, packed >> 4], dim=2).reshape(n, scales.shape[1], -1)  # [N, K/G, G]
    w = q.float() * scales[..., None].float() + mins[..., None].float()
    return w.reshape(n, -1).to(dtype)
