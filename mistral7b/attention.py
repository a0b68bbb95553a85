"""Attention over the padded layout of a `StepPlan`: masked, causal, or a causal sliding-window band.

Sequences that start at position 0 and are longer than the window W (training, scoring, one-shot
prefill) never get a dense [L, L] mask. Without autograd on the CPU, queries are cut into blocks of
W and the band is computed exactly, with no mask at all (`_band_by_window_blocks`): each block
attends causally to itself, and (both orders reversed, which makes the band's upper triangle a
causal one) to the W - 1 keys before it; the two parts are merged through their log-sum-exps.
Work is L x W scores, all on SDPA's fast causal path. Otherwise (training, other devices) a block of
queries [s, e) attends to keys [s - W + 1, e) under one shared band mask: L x (W + block) scores.
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


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal SDPA (query r sees keys c <= r) on the CPU -> (out [B, H, L, hd], log-sum-exp [B, H, L]).
    This op takes as many kv heads as query heads: grouped ones are repeated (a block's worth)."""
    if k.shape[1] != q.shape[1]:
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True)


def _band_by_window_blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
    """The exact band i - W < j <= i in blocks of W queries (see the module docstring); q [B, H, L, hd]."""
    length, outs = q.shape[2], []
    for s in range(0, length, window):
        e = min(s + window, length)
        out, lse = _flash(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e])  # the block itself
        if s and e - s == window:
            # Query s + r also sees keys s - W + 1 + c for c >= r, c < W - 1 (the last query, r = W - 1,
            # sees none): reversing queries s..e-2 and those keys makes that "c <= r", i.e. causal.
            before, before_lse = _flash(q[:, :, s:e - 1].flip(2), k[:, :, s - window + 1:s].flip(2),
                                        v[:, :, s - window + 1:s].flip(2))
            top = torch.maximum(lse[:, :, :-1], before_lse.flip(2))
            own_w, before_w = torch.exp(lse[:, :, :-1] - top)[..., None], torch.exp(before_lse.flip(2) - top)[..., None]
            merged = (out[:, :, :-1].float() * own_w + before.flip(2).float() * before_w) / (own_w + before_w)
            out = torch.cat([merged.to(out.dtype), out[:, :, -1:]], dim=2)
        elif s:  # a last, shorter block: its W-key band under a mask
            keys = slice(s - window + 1, e)
            rows = torch.arange(e - s, device=q.device)[:, None]
            cols = torch.arange(e - keys.start, device=q.device)[None, :]
            out = F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, keys], v[:, :, keys],
                                                 attn_mask=(cols >= rows) & (cols <= rows + window - 1), enable_gqa=True)
        outs.append(out)
    return torch.cat(outs, dim=2)


def sliding_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                             block: int | None = None) -> torch.Tensor:
    """Causal attention where query i sees keys i - W < j <= i; index = position (rows start at 0).

    q [B, H, L, hd], k, v [B, Hkv, L, hd] -> [B, H, L, hd]. Padding at the end of a row is harmless:
    a padded key comes after every real query of its row, and a padded query's output is discarded.
    """
    if (block is None and q.is_cpu and q.shape[-1] == v.shape[-1]  # the flash op's conditions
            and not (torch.is_grad_enabled() and q.requires_grad)):
        return _band_by_window_blocks(q, k, v, window)
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
