"""GGUF's quantized blocks as our int8/int4 layers, without a trip through fp32.

Our int4 layout is GGUF's Q4_0/Q4_1 block packing (per 32 weights: byte j holds weight j in its low
nibble and weight j+16 in its high one) with w = q * scale + min, so:

* Q8_0 (per 32: f16 d, 32 x int8)            -> int8, group 32: scale d
* Q4_0 (per 32: f16 d, 16 bytes)             -> int4: scale d, min -8 d
* Q4_1 (per 32: f16 d, f16 m, 16 bytes)      -> int4: scale d, min m
* Q4_K (per 256: f16 d, f16 dmin, 12 bytes of 6-bit sub-scales/mins, 128 bytes) -> int4, group 32:
  scale d * sc, min -dmin * m; its nibbles are ordered per 64 weights (low nibbles: the first 32,
  high: the next 32) and are re-paired into our order.

All four are exact: the layer computes the weights ggml's dequantizer gives (tests/test_quant.py).
"""

from __future__ import annotations

import numpy as np
import torch

from ..gguf_lib import GGMLQuantizationType as Q

PACKED_MODES = {Q.Q8_0: "int8", Q.Q4_0: "int4", Q.Q4_1: "int4", Q.Q4_K: "int4"}


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    """The f16 at byte `start` of each block [..., block_bytes] -> float16 [...]."""
    return np.ascontiguousarray(blocks[..., start:start + 2]).view(np.float16)[..., 0]


def _split(data: np.ndarray, n: int, block_bytes: int, head_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of blocks uint8 [n, bytes per row] -> (their heads [n, blocks, head_bytes], their other bytes
    [n, blocks * (block_bytes - head_bytes)]), both contiguous. The copies go by the widest word that
    divides the block (4 bytes for Q4_1, 2 for Q4_0 and Q8_0): numpy copies a strided slice element
    by element, so byte-wise copies cost 2-4x as much (~0.1 s of loading the default model)."""
    word = np.uint32 if block_bytes % 4 == 0 and head_bytes % 4 == 0 else np.uint16
    size = np.dtype(word).itemsize
    blocks = data.view(word).reshape(n, -1, block_bytes // size)
    head = np.ascontiguousarray(blocks[..., :head_bytes // size]).view(np.uint8)
    return head, np.ascontiguousarray(blocks[..., head_bytes // size:]).view(np.uint8).reshape(n, -1)


def _k4_scales_mins(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K's 12 bytes [..., 12] -> 8 six-bit scales and 8 six-bit mins [..., 8] each."""
    q = packed.astype(np.uint8)
    low = q[..., 0:4] & 63, q[..., 4:8] & 63  # sub-blocks 0-3: plain 6-bit values
    high_sc = (q[..., 8:12] & 0x0F) | ((q[..., 0:4] >> 6) << 4)  # sub-blocks 4-7: 4 bits + 2 top bits
    high_m = (q[..., 8:12] >> 4) | ((q[..., 4:8] >> 6) << 4)
    return np.concatenate([low[0], high_sc], -1), np.concatenate([low[1], high_m], -1)


def _repack_k4(qs: np.ndarray) -> np.ndarray:
    """Q4_K nibbles [..., 128] (per 64 weights: 32 bytes, low nibbles first 32 weights) -> our
    Q4 block packing [..., 128] (per 32 weights: 16 bytes, byte j = w[j] | w[j + 16] << 4)."""
    chunks = qs.reshape(*qs.shape[:-1], 4, 2, 16)  # [..., chunk, half of 32 bytes, 16]
    first, second = chunks[..., 0, :], chunks[..., 1, :]  # bytes j and j + 16 of the chunk
    low = (first & 0x0F) | ((second & 0x0F) << 4)  # sub-block 2c
    high = (first >> 4) | (second & 0xF0)  # sub-block 2c + 1
    return np.stack([low, high], -2).reshape(qs.shape)


def pack(data: np.ndarray, kind: Q) -> tuple[str, tuple[torch.Tensor, ...]]:
    """Raw GGUF rows uint8 [N, bytes per row] of type `kind` -> (mode, tensors of that layer type):
    int8: (qweight int8 [N, K], scales [N, K/32]); int4: (qweight uint8 [N, K/2], scales, mins)."""
    n = data.shape[0]
    if kind == Q.Q8_0:
        head, q = _split(data, n, 34, 2)
        scales = head.view(np.float16)[..., 0].astype(np.float32)
        return "int8", (torch.from_numpy(q.view(np.int8)), torch.from_numpy(scales))
    if kind in (Q.Q4_0, Q.Q4_1):
        head, q = _split(data, n, 18 if kind == Q.Q4_0 else 20, 2 if kind == Q.Q4_0 else 4)
        halves = head.view(np.float16)  # [n, blocks, 1 or 2]: d, then Q4_1's m
        d = np.ascontiguousarray(halves[..., 0])  # fp16 as in the file
        # Q4_0's min, -8 d, is exact in fp16 when finite
        m = np.ascontiguousarray(halves[..., 1]) if kind == Q.Q4_1 else -8 * d.astype(np.float32)
        if m.dtype != np.float16:
            d, m = (d, m.astype(np.float16)) if np.abs(m).max(initial=0) <= 65504 else (d.astype(np.float32), m)
        return "int4", (torch.from_numpy(q), torch.from_numpy(d), torch.from_numpy(m))
    if kind == Q.Q4_K:
        blocks = data.reshape(n, -1, 144)
        sc, mn = _k4_scales_mins(blocks[..., 4:16])  # [n, superblocks, 8]
        scales = _f16(blocks, 0).astype(np.float32)[..., None] * sc  # products need fp32
        mins = -_f16(blocks, 2).astype(np.float32)[..., None] * mn
        q = _repack_k4(blocks[..., 16:]).reshape(n, -1)
        return "int4", tuple(torch.from_numpy(np.ascontiguousarray(t)) for t in
                             (q, scales.reshape(n, -1), mins.reshape(n, -1)))
    raise ValueError(f"GGUF type {kind.name} has no packed int8/int4 form")
