"""The rolling-buffer KV cache and the per-step attention plan.

Every forward, whatever its shape (one-shot prefill, a prefill chunk, batched decode, training), is
described by one `StepPlan` built once and shared by all layers:

* the packed batch of T tokens is scattered into a padded [B, L] layout for attention and gathered
  back afterwards (`pad_index`);
* keys are the cached slots of each sequence followed by the step's own new tokens, and beside each
  key we know the absolute position it holds (-1 when empty or padding), so one rule gives the mask
  of every case: same sequence, `k_pos <= q_pos` and `q_pos - k_pos < W`. Two cases need no mask:
  a decode step's rows all filled to the same slot (the common batch-1 decode), and one sequence's
  pre-fill chunk, whose cached keys are read in position order so that attention.py's band applies.

Cache layout: position p of a sequence lives in slot `p % S`, where S (slots per sequence) is the
sliding window W for windowed models, so cache memory stops growing at W tokens per sequence.
RoPE is applied before keys are cached, so slot order never matters to a mask (only the band
needs position order, which a roll of the slots restores).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .args import ModelArgs
from .errors import InputError


def slots_per_sequence(args: ModelArgs, max_len: int | None) -> int:
    """Cache slots one sequence holds, whatever its length: the sliding window W for windowed
    models (fewer when max_len is shorter), else max_len."""
    window = args.sliding_window
    if max_len is None and window is None:
        raise ValueError("a cache for a model without sliding window needs max_len")
    return min(window, max_len) if window is not None and max_len is not None else (window or max_len)


@dataclass
class StepPlan:
    """Metadata of one packed forward, shared by all layers. B sequences, padded length L, T tokens."""

    positions: torch.Tensor  # [T] absolute position of each packed token
    pad_index: torch.Tensor | None  # [T] index of each token in the flattened [B*L] layout; None: no padding
    batch: int  # B
    length: int  # L = max(seqlens)
    mask: torch.Tensor | None  # [B, 1, L, K] bool, K = cached slots + L; None: causal (or `window`)
    # The causal W-key band with no mask (attention.py): rows from position 0 longer than W without a
    # cache, or one sequence's chunk through the cache (its keys: cached ones, then the chunk's; W
    # spans them all for a model without a sliding window).
    window: int | None = None
    key_shift: int = 0  # a wrapped rolling row: its oldest cached position sits in this slot
    rows: slice | torch.Tensor | None = None  # cache rows of the B sequences
    used_slots: int = 0  # slots [0, used_slots) hold every cached key of these rows
    write_src: torch.Tensor | None = None  # [N] packed token indices whose K/V are cached
    write_dst: torch.Tensor | None = None  # [N] flat slot indices in [max_seqs * S]
    new_slot_pos: torch.Tensor | None = None  # [N] positions written to those slots
    decode: bool = False  # one new token per sequence: written first, then attended in place


def _attention_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, q_valid: torch.Tensor, window: int | None) -> torch.Tensor:
    """q_pos [B, L], k_pos [B, K] (-1: empty), q_valid [B, L] -> mask [B, 1, L, K] (True = attend)."""
    q = q_pos[:, :, None]
    k = k_pos[:, None, :]
    mask = (k >= 0) & (k <= q)
    if window is not None:
        mask &= (q - k) < window
    # Padding queries attend everywhere: their outputs are discarded, and a fully masked row is NaN.
    mask |= ~q_valid[:, :, None]
    return mask[:, None]


def _padded_layout(seqlens: list[int], starts: torch.Tensor, device: torch.device):
    """-> q_pos [B, L], q_valid [B, L], pad_index [T] (None when B == 1)."""
    lens = torch.tensor(seqlens, device=device)
    steps = torch.arange(max(seqlens), device=device)
    q_valid = steps[None, :] < lens[:, None]
    q_pos = starts[:, None] + steps[None, :]
    pad_index = None if len(seqlens) == 1 else torch.nonzero(q_valid.flatten()).squeeze(1)
    return q_pos, q_valid, pad_index


def plan_without_cache(seqlens: list[int], window: int | None, device: torch.device) -> StepPlan:
    """Independent sequences starting at position 0 (training, scoring, one-shot prefill).

    Each padded row holds its tokens at positions 0..n-1, so a key's index is its position and no
    mask is needed: plain causal attention, or the W-key band once a row is longer than W. Padding
    sits at the end of a row, after every real query, so causality already hides it.
    """
    _check_seqlens(seqlens)
    starts = torch.zeros(len(seqlens), dtype=torch.long, device=device)
    q_pos, q_valid, pad_index = _padded_layout(seqlens, starts, device)
    banded = window is not None and max(seqlens) > window
    return StepPlan(positions=q_pos[q_valid], pad_index=pad_index, batch=len(seqlens), length=max(seqlens),
                    mask=None, window=window if banded else None)


def _check_seqlens(seqlens: list[int]) -> None:
    if not seqlens or any(n <= 0 for n in seqlens):
        raise InputError(f"seqlens must be a non-empty list of positive lengths, got {seqlens}")


class KVCache:
    """Keys and values of up to `max_seqs` sequences, S slots each (S = W for windowed models).

    k, v: [n_layers, max_seqs, S, n_kv_heads, head_dim]; slot_pos: [max_seqs, S] (-1 = empty).
    `lengths[row]` is how many tokens of that sequence have been processed (its next position).
    """

    def __init__(self, args: ModelArgs, max_seqs: int, max_len: int | None = None, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        window = args.sliding_window
        self.slots = slots_per_sequence(args, max_len)
        # Rolling over (p % S) is only exact when S covers the whole window.
        self.rolling = window is not None and self.slots == window
        self.window = window
        self.max_seqs = max_seqs
        shape = (args.n_layers, max_seqs, self.slots, args.n_kv_heads, args.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.slot_pos = torch.full((max_seqs, self.slots), -1, dtype=torch.long, device=device)
        self.lengths = [0] * max_seqs

    @property
    def device(self) -> torch.device:
        return self.k.device

    def reset(self, rows: list[int] | None = None) -> None:
        """Forget sequences (all by default) so their rows can be reused."""
        for row in range(self.max_seqs) if rows is None else rows:
            self.slot_pos[row] = -1
            self.lengths[row] = 0

    def truncate(self, row: int, length: int) -> bool:
        """Forget a sequence's positions >= length (to re-feed a changed tail). Impossible once the
        rolling buffer has evicted anything (the earlier keys are gone): returns False then."""
        if self.lengths[row] > self.slots or length > self.lengths[row]:
            return False
        self.slot_pos[row].masked_fill_(self.slot_pos[row] >= length, -1)
        self.lengths[row] = length
        return True

    def plan(self, seqlens: list[int], rows: list[int] | None = None) -> StepPlan:
        """Plan a step that appends seqlens[i] tokens to sequence rows[i] (rows default to 0..B-1)."""
        _check_seqlens(seqlens)
        rows = list(range(len(seqlens))) if rows is None else list(rows)
        if len(rows) != len(seqlens) or len(set(rows)) != len(rows) or not all(0 <= r < self.max_seqs for r in rows):
            raise InputError(f"rows {rows} must be {len(seqlens)} distinct cache rows in [0, {self.max_seqs})")
        device = self.device
        starts_list = [self.lengths[r] for r in rows]
        for r, start, n in zip(rows, starts_list, seqlens):
            if not self.rolling and start + n > self.slots:
                raise InputError(f"sequence in cache row {r} would reach {start + n} tokens, "
                                 f"more than the cache holds ({self.slots})")
        contiguous = rows == list(range(rows[0], rows[0] + len(rows)))
        row_index = slice(rows[0], rows[0] + len(rows)) if contiguous else torch.tensor(rows, device=device)
        if all(n == 1 for n in seqlens):
            return self._decode_plan(rows, row_index, starts_list)
        starts = torch.tensor(starts_list, device=device)
        q_pos, q_valid, pad_index = _padded_layout(seqlens, starts, device)
        # Slots fill from 0 up; until a row wraps, attention only needs the filled prefix.
        used = max(min(start, self.slots) for start in starts_list)
        mask, window, key_shift = None, None, 0
        if len(seqlens) == 1:
            # One sequence: its cached keys in position order (slots [0, used) in turn from the oldest
            # position's, start % S, once wrapped), then the band over them and the chunk's own. Without
            # a sliding window the band spans every key: all cached keys, and the chunk's causally.
            window = self.window or used + seqlens[0]
            key_shift = starts_list[0] % self.slots if starts_list[0] >= self.slots else 0
        else:
            k_pos = torch.cat([self.slot_pos[row_index, :used], torch.where(q_valid, q_pos, -1)], dim=1)
            mask = _attention_mask(q_pos, k_pos, q_valid, self.window)

        # Only the last S tokens of each sequence's chunk survive in the cache; writing the
        # earlier ones too would race on duplicate slots.
        positions = q_pos[q_valid]  # [T]
        ends = (starts + torch.tensor(seqlens, device=device))[:, None].expand_as(q_pos)[q_valid]
        row_of = torch.tensor(rows, device=device)[:, None].expand_as(q_pos)[q_valid]
        keep = positions >= ends - self.slots
        write_src = torch.nonzero(keep).squeeze(1)
        new_pos = positions[write_src]
        write_dst = row_of[write_src] * self.slots + new_pos % self.slots
        return StepPlan(positions=positions, pad_index=pad_index, batch=len(seqlens), length=max(seqlens),
                        mask=mask, window=window, key_shift=key_shift, rows=row_index, used_slots=used,
                        write_src=write_src, write_dst=write_dst, new_slot_pos=new_pos)

    def _decode_plan(self, rows: list[int], row_index: slice | torch.Tensor, starts: list[int]) -> StepPlan:
        """One token per sequence (batched decode): each token's K/V go straight into its slot
        (p % S overwrites position p - S, which the window no longer shows) and attention reads
        the rows' first `used` slots in place, with no copy of the cache.

        Planned from Python ints (each small tensor op costs a visible share of a CPU decode step):
        slots fill from 0 up (p % S) and a rolling row keeps exactly the last S = W positions, so
        after the write a row at position p holds valid keys in slots [0, min(p + 1, S)) and
        nothing else; the mask only marks each row's filled prefix."""
        device = self.device
        fills = [min(p + 1, self.slots) for p in starts]
        used = max(fills)
        positions = torch.tensor(starts, device=device)  # [B]
        write_dst = torch.tensor([r * self.slots + p % self.slots for r, p in zip(rows, starts)], device=device)
        mask = None
        if min(fills) < used:  # [B, 1, 1, used]
            mask = (torch.arange(used, device=device) < torch.tensor(fills, device=device)[:, None])[:, None, None, :]
        return StepPlan(positions=positions, pad_index=None, batch=len(rows), length=1, mask=mask, rows=row_index,
                        used_slots=used, write_src=None, write_dst=write_dst, new_slot_pos=positions, decode=True)

    def append_and_read(self, layer: int, plan: StepPlan, k: torch.Tensor, v: torch.Tensor):
        """Decode: store k, v [B, n_kv_heads, head_dim] in their slots, then return the rows'
        keys and values [B, n_kv_heads, used_slots, head_dim] (views of the cache when rows are contiguous)."""
        self.k[layer].view(-1, *self.k.shape[-2:]).index_copy_(0, plan.write_dst, k.to(self.k.dtype))
        self.v[layer].view(-1, *self.v.shape[-2:]).index_copy_(0, plan.write_dst, v.to(self.v.dtype))
        keys = self.k[layer, plan.rows, :plan.used_slots].transpose(1, 2)
        return keys, self.v[layer, plan.rows, :plan.used_slots].transpose(1, 2)

    def keys_values(self, layer: int, plan: StepPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached K and V of the plan's sequences: [B, used_slots, n_kv_heads, head_dim] each, in slot
        order, or in position order when the plan has a key_shift."""
        keys, values = self.k[layer, plan.rows, :plan.used_slots], self.v[layer, plan.rows, :plan.used_slots]
        if plan.key_shift:
            return keys.roll(-plan.key_shift, dims=1), values.roll(-plan.key_shift, dims=1)
        return keys, values

    def write(self, layer: int, plan: StepPlan, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the step's new k, v ([T, n_kv_heads, head_dim]) of one layer into their slots."""
        flat_k = self.k[layer].view(-1, *self.k.shape[-2:])
        flat_v = self.v[layer].view(-1, *self.v.shape[-2:])
        flat_k.index_copy_(0, plan.write_dst, k[plan.write_src].to(flat_k.dtype))
        flat_v.index_copy_(0, plan.write_dst, v[plan.write_src].to(flat_v.dtype))

    def commit(self, plan: StepPlan, seqlens: list[int], rows: list[int] | None = None) -> None:
        """After all layers ran: record which positions the slots now hold and advance lengths."""
        self.slot_pos.view(-1).index_copy_(0, plan.write_dst, plan.new_slot_pos)
        for r, n in zip(range(len(seqlens)) if rows is None else rows, seqlens):
            self.lengths[r] += n

    def nbytes_per_sequence(self) -> int:
        """Bytes of K/V memory one sequence occupies (constant: S slots)."""
        return 2 * self.k[:, 0].numel() * self.k.element_size()
