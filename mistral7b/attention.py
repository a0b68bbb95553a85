"""Attention over the padded layout of a `StepPlan`: masked, causal, or a causal sliding-window band.

Sequences that start at position 0 and are longer than the window W (training, scoring, one-shot
prefill) never get a dense [L, L] mask: queries are cut into blocks, and a block of queries
[s, e) attends only to keys [s - W + 1, e), so the work grows with L x (W + block), not L^2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .cache import StepPlan


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: StepPlan) -> torch.Tensor:
    """q [B, H, L, hd], k, v [B, Hkv, K, hd] -> [B, H, L, hd] (H a multiple of Hkv)."""
    if plan.window is not None:
        return sliding_window_attention(q, k, v, plan.window)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=plan.mask,
                                          is_causal=plan.mask is None and q.shape[2] > 1, enable_gqa=True)


def default_block(window: int) -> int:
    """Queries per block. A block of b queries computes b x (b + W - 1) scores for b x W useful ones,
    so smaller is less waste; but on CPU, SDPA calls of fewer than ~768 queries ran 1.5-2x slower per
    score (smaller internal tiles). Measured best: 768 at W=1024; 1024 of 512/1024/2048 at W=4096."""
    return max(768, window // 4)


def sliding_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                             block: int | None = None) -> torch.Tensor:
    """Causal attention where query i sees keys i - W < j <= i; index = position (rows start at 0).

    q [B, H, L, hd], k, v [B, Hkv, L, hd] -> [B, H, L, hd]. Padding at the end of a row is harmless:
    a padded key comes after every real query of its row, and a padded query's output is discarded.
    """
    length = q.shape[2]
    head = min(window, length)
    # The first W queries see every earlier key: plain causal, no mask.
    outs = [F.scaled_dot_product_attention(q[:, :, :head], k[:, :, :head], v[:, :, :head],
                                           is_causal=True, enable_gqa=True)]
    if length > window:
        block = block or default_block(window)
        # Block [s, e) against keys [s - W + 1, e): query r sees key column c iff r <= c <= r + W - 1.
        rows = torch.arange(block, device=q.device)[:, None]
        cols = torch.arange(block + window - 1, device=q.device)[None, :]
        band = (cols >= rows) & (cols <= rows + window - 1)  # [block, block + W - 1]
        for s in range(window, length, block):
            e = min(s + block, length)
            keys = slice(s - window + 1, e)
            outs.append(F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, keys], v[:, :, keys],
                                                       attn_mask=band[:e - s, :e - keys.start], enable_gqa=True))
    return torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
