"""Attention over the padded layout of a `StepPlan`: masked, causal, or a causal sliding-window band.

The band never needs a dense mask. It serves sequences that start at position 0 and are longer than
the window W (training, scoring, one-shot prefill), and a single sequence's prefill chunk through a
rolling cache, whose cached keys come first in position order: query r of Lq is then key
Lk - Lq + r. Without autograd on the CPU, the queries are cut into blocks of at most W and the band
is computed exactly, with no mask at all (`_band_by_window_blocks`): each block attends causally to
its own keys, fully to the keys before it that all its queries see, and (both orders reversed, which
makes the band's edge a causal one) to the keys that only its first queries see; the parts are
merged through their log-sum-exps. Work is Lq x W scores, all on the CPU flash kernel. Otherwise
(training, other devices) a block of queries attends to the W - 1 keys before it and its own under
one band mask: Lq x (W + block) scores.
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
    so smaller is less waste; but on CPU, SDPA runs small calls slower per score (smaller internal
    tiles). The sizes that measured best are in BENCHMARKS.md ("Small measurements")."""
    return max(768, window // 4)


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """SDPA on the CPU -> (out [B, H, Lq, hd], log-sum-exp [B, H, Lq]); causal: query r sees keys c <= r
    (top-left, also when Lq != Lk). This op takes as many kv heads as query heads: grouped ones are
    repeated (a block's worth)."""
    if k.shape[1] != q.shape[1]:
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal)[:2]


def _merge(out: torch.Tensor, lse: torch.Tensor, part: torch.Tensor, part_lse: torch.Tensor):
    """Softmax attention over the union of two key sets, from each set's output and log-sum-exp;
    `part` covers the first part.shape[2] queries of `out`."""
    n = part.shape[2]
    top = torch.maximum(lse[:, :, :n], part_lse)
    w_out, w_part = torch.exp(lse[:, :, :n] - top), torch.exp(part_lse - top)  # [B, H, n]
    merged = (out[:, :, :n].float() * w_out[..., None] + part.float() * w_part[..., None]) / (w_out + w_part)[..., None]
    return (torch.cat([merged.to(out.dtype), out[:, :, n:]], dim=2),
            torch.cat([top + torch.log(w_out + w_part), lse[:, :, n:]], dim=2))


def _band_by_window_blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
    """The exact band (query r is key i = Lk - Lq + r and sees keys i - W < j <= i) in blocks of W
    queries (see the module docstring); q [B, H, Lq, hd], k, v [B, Hkv, Lk, hd]."""
    offset, outs = k.shape[2] - q.shape[2], []
    for s in range(0, q.shape[2], window):
        e = min(s + window, q.shape[2])
        n, first = e - s, offset + s  # the block's queries are keys [first, first + n)
        out, lse = _flash(q[:, :, s:e], k[:, :, first:first + n], v[:, :, first:first + n], causal=True)
        # Query r sees key j < first iff j >= lo + r: keys [lo + n - 1, first) are seen by every query...
        lo = first - window + 1
        if max(0, lo + n - 1) < first:
            keys = slice(max(0, lo + n - 1), first)
            out, lse = _merge(out, lse, *_flash(q[:, :, s:e], k[:, :, keys], v[:, :, keys], causal=False))
        # ...and keys [lo, lo + n - 1) by queries r <= j - lo: reversing queries 0..n-2 and those
        # keys makes that "c <= r", causal (keys before 0 do not exist: fewer keys, still causal).
        if lo + n - 1 > 0 and n > 1:
            keys = slice(max(0, lo), lo + n - 1)
            part, part_lse = _flash(q[:, :, s:e - 1].flip(2), k[:, :, keys].flip(2), v[:, :, keys].flip(2), causal=True)
            out, lse = _merge(out, lse, part.flip(2), part_lse.flip(2))
        outs.append(out)
    return torch.cat(outs, dim=2)


def sliding_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                             block: int | None = None) -> torch.Tensor:
    """Causal attention where query i sees keys i - W < j <= i, queries being the last Lq of Lk keys.

    q [B, H, Lq, hd], k, v [B, Hkv, Lk, hd] with Lk >= Lq (Lk - Lq keys from a cache, in position
    order) -> [B, H, Lq, hd]. Padding at the end of a row is harmless: a padded key comes after every
    real query of its row, and a padded query's output is discarded.
    """
    if (block is None and q.is_cpu and q.shape[-1] == v.shape[-1]  # the flash op's conditions
            and not (torch.is_grad_enabled() and q.requires_grad)):
        return _band_by_window_blocks(q, k, v, window)
    length, offset = q.shape[2], k.shape[2] - q.shape[2]
    # From position 0, the first W queries see every earlier key: plain causal, no mask.
    head = min(window, length) if offset == 0 else 0
    outs = [F.scaled_dot_product_attention(q[:, :, :head], k[:, :, :head], v[:, :, :head],
                                           is_causal=True, enable_gqa=True)] if head else []
    block = block or default_block(window)
    for s in range(head, length, block):
        e = min(s + block, length)
        # Queries [s, e) are keys [offset + s, offset + e); they see keys from offset + s - W + 1.
        keys = slice(max(0, offset + s - window + 1), offset + e)
        query_key = torch.arange(offset + s, offset + e, device=q.device)[:, None]
        key = torch.arange(keys.start, keys.stop, device=q.device)[None, :]
        band = (key <= query_key) & (key > query_key - window)
        outs.append(F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, keys], v[:, :, keys],
                                                   attn_mask=band, enable_gqa=True))
    return torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
