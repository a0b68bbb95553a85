"""The paged KV cache and the per-step attention plan.

Every forward, whatever its shape (one-shot prefill, a prefill chunk, batched decode, training), is
described by one `StepPlan` built once and shared by all layers:

* the packed batch of T tokens is scattered into a padded [B, L] layout for attention and gathered
  back afterwards (`pad_index`);
* keys are the cached slots of each sequence followed by the step's own new tokens, and beside each
  key we know the absolute position it holds (-1 when empty or padding), so one rule gives the mask
  of every case: same sequence, `k_pos <= q_pos` and `q_pos - k_pos < W`. Two cases need no mask:
  a decode step's rows all filled to the same slot (the common batch-1 decode), and one sequence's
  pre-fill chunk, whose cached keys are read in position order so that attention.py's band applies.

Cache layout (paged, as vLLM's): keys and values live in a pool of blocks of `block_size` slots.
A sequence holds a block table: its logical block b (positions [b * BS, (b + 1) * BS)) is physical
block table[b - first]. Blocks are taken from the pool as a sequence grows and given back when it
ends; for a windowed model a block whose positions have all left the window of the sequence's next
query goes back at once, so a sequence holds at most ceil(W / BS) + 1 blocks however long it runs.
A sequence's cached positions are therefore contiguous and in table order: its slot j (counted from
its first held block) holds position first * BS + j, so the positions of every key, and with them
every mask, follow from two integers per row. RoPE is applied before keys are cached.

Full blocks can be shared: `publish` files a block under the hash of its tokens and all tokens
before it (the engine computes it, see engine/prefix.py), `lookup` finds the longest usable chain of
such blocks for a new prompt, and `attach` makes a new sequence start on them. Shared blocks are
reference-counted and never written; a block nobody holds but that is published stays cached until
the pool needs it (least recently released first).
"""

from __future__ import annotations

import math
import mmap
from collections import OrderedDict
from dataclasses import dataclass

import torch

from .args import ModelArgs
from .errors import InputError, Mistral7BError


DEFAULT_BLOCK_SIZE = 32  # slots per block: a table entry per 32 positions keeps each step's slot index small


def slots_per_sequence(args: ModelArgs, max_len: int | None) -> int:
    """Positions one sequence's attention spans, whatever its length: the sliding window W for
    windowed models (fewer when max_len is shorter), else max_len."""
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
    # cache, or one sequence's chunk through the cache (its keys: cached ones in position order, then
    # the chunk's; W spans them all for a model without a sliding window).
    window: int | None = None
    # Each row's keys from the cache are its slots [0, used_slots): decode reads them after writing
    # the new token (which they include), a chunk before writing its own.
    used_slots: int = 0
    slots: torch.Tensor | None = None  # [B, >= used_slots] flat slot index (block * BS + offset) of slot j
    first_pos: list[int] | None = None  # [B] the position each row's slot 0 holds
    write_src: torch.Tensor | None = None  # [N] packed token indices whose K/V are cached
    write_dst: torch.Tensor | None = None  # [N] flat slot indices in [n_blocks * BS]
    decode: bool = False  # one new token per sequence: written first, then attended in the cache


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


class CacheFull(Mistral7BError):
    """The block pool has no free block left (the engine schedules within `free_blocks`)."""


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """torch.zeros; on the CPU an anonymous memory map, whose pages the OS zeroes on first touch. A
    cache sized for a whole context then costs neither time nor resident memory until its blocks
    are used (torch.zeros writes every byte: 0.06 s and 180 MB for the default model's chat). Not
    numpy's calloc: numpy asks for huge pages, so each block's first write would zero 2 MiB."""
    nbytes = math.prod(shape) * dtype.itemsize
    if torch.device(device).type != "cpu" or nbytes == 0 or not hasattr(mmap, "MAP_ANONYMOUS"):
        return torch.zeros(shape, dtype=dtype, device=device)
    pages = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # private: a fork copies on write
    return torch.frombuffer(pages, dtype=torch.uint8).view(dtype).view(shape)


class KVCache:
    """Keys and values of up to `max_seqs` sequences (cache rows: handles) in a pool of blocks.

    k, v: [n_layers, n_blocks, block_size, n_kv_heads, head_dim]. `lengths[row]`: tokens processed
    (the sequence's next position). `n_blocks` defaults to `pool_blocks(...)`: every row at its
    longest, plus one window's worth of chunk; a smaller pool serves more rows than it could hold at
    full length, as the engine admits and chunks by free blocks.
    """

    def __init__(self, args: ModelArgs, max_seqs: int, max_len: int | None = None, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 n_blocks: int | None = None, block_size: int = DEFAULT_BLOCK_SIZE):
        self.window = args.sliding_window
        self.slots = slots_per_sequence(args, max_len)
        # A model without a window, or a max_len under it, needs every position: the sequence must fit.
        self.max_len = None if self.window is not None and self.slots == self.window else self.slots
        self.block_size, self.max_seqs = block_size, max_seqs
        self.blocks_per_seq = math.ceil(self.slots / block_size) + (self.max_len is None)
        self.n_blocks = n_blocks or self.blocks_per_seq * max_seqs + (self.max_len is None) * self.blocks_per_seq
        shape = (args.n_layers, self.n_blocks, block_size, args.n_kv_heads, args.head_dim)
        self.k, self.v = _zeros(shape, dtype, device), _zeros(shape, dtype, device)
        self.lengths = [0] * max_seqs
        self.tables: list[list[int]] = [[] for _ in range(max_seqs)]  # physical blocks, logical order
        self.first = [0] * max_seqs  # logical index of tables[row][0]
        self.refs = [0] * self.n_blocks
        self.free: list[int] = list(range(self.n_blocks - 1, -1, -1))  # never used or unpublished
        self.cached: OrderedDict[int, None] = OrderedDict()  # published, unheld: reusable, LRU first
        self.hash_of: dict[int, int] = {}  # published block -> its hash
        self.by_hash: dict[int, int] = {}
        self._arange = torch.arange(block_size, device=device)
        # Positions kept past the window, so that a step's last `rollback` positions can be cut out
        # again (speculative decoding's rejected guesses) without losing keys the window still sees.
        self.rollback = 0

    @property
    def device(self) -> torch.device:
        return self.k.device

    # -- blocks --------------------------------------------------------------------------------
    @property
    def free_blocks(self) -> int:
        """Blocks a sequence could take now (free ones and cached ones nobody holds)."""
        return len(self.free) + len(self.cached)

    @property
    def used_blocks(self) -> int:
        return self.n_blocks - self.free_blocks

    def blocks_needed(self, row: int, n: int) -> int:
        """New blocks that appending n tokens to a row takes."""
        end_block = (self.lengths[row] + n - 1) // self.block_size
        return max(0, end_block + 1 - self.first[row] - len(self.tables[row]))

    def _take(self) -> int:
        if self.free:
            block = self.free.pop()
        elif self.cached:
            block, _ = self.cached.popitem(last=False)  # the least recently released published block
            del self.by_hash[self.hash_of.pop(block)]
        else:
            raise CacheFull("the KV cache has no free block")
        self.refs[block] = 1
        return block

    def _drop(self, block: int) -> None:
        self.refs[block] -= 1
        if self.refs[block] == 0:
            if block in self.hash_of:
                self.cached[block] = None
            else:
                self.free.append(block)

    def _grow(self, row: int, end: int) -> None:
        """Give the row blocks up to position end - 1."""
        table = self.tables[row]
        while self.first[row] + len(table) <= (end - 1) // self.block_size:
            table.append(self._take())

    def _forget_before(self, row: int, position: int) -> None:
        """Give back the row's blocks whose positions are all < position."""
        drop = min(position // self.block_size - self.first[row], len(self.tables[row]))
        if drop > 0:
            for block in self.tables[row][:drop]:
                self._drop(block)
            del self.tables[row][:drop]
            self.first[row] += drop

    def held_blocks(self, row: int) -> int:
        return len(self.tables[row])

    # -- prefix sharing --------------------------------------------------------------------------
    def publish(self, row: int, logical_block: int, block_hash: int) -> None:
        """File the row's full logical block under block_hash (a hash of its tokens and all before)."""
        index = logical_block - self.first[row]
        if not 0 <= index < len(self.tables[row]) or block_hash in self.by_hash:
            return
        block = self.tables[row][index]
        if block not in self.hash_of:
            self.hash_of[block], self.by_hash[block_hash] = block_hash, block

    def lookup(self, hashes: list[int]) -> tuple[int, list[int]]:
        """The longest usable cached prefix of a prompt whose full blocks have these hashes:
        (first logical block, physical blocks from it on). The rule: a prefix of k blocks is usable
        when every block the prompt's next position can attend to is cached: blocks
        [(k * BS - W + 1) // BS, k) with a window (earlier ones may have been evicted), all of [0, k)
        without."""
        missing = [0]  # missing[i]: how many of the first i blocks are not cached
        for h in hashes:
            missing.append(missing[-1] + (h not in self.by_hash))
        for k in range(len(hashes), 0, -1):  # longest first; a later block may be cached when an earlier is not
            start = max(0, k * self.block_size - self.window + 1) // self.block_size if self.window else 0
            if missing[k] == missing[start]:
                return start, [self.by_hash[h] for h in hashes[start:k]]
        return 0, []

    def attach(self, row: int, first: int, blocks: list[int]) -> int:
        """Start an empty row on shared blocks (logical first, first + 1, ...); returns the tokens it
        then holds."""
        assert self.lengths[row] == 0 and not self.tables[row]
        for block in blocks:
            if self.refs[block] == 0:
                self.cached.pop(block, None)
            self.refs[block] += 1
        self.tables[row], self.first[row] = list(blocks), first
        self.lengths[row] = (first + len(blocks)) * self.block_size
        return self.lengths[row]

    # -- rows --------------------------------------------------------------------------------------
    def reset(self, rows: list[int] | None = None) -> None:
        """Forget sequences (all by default) so their rows can be reused; their blocks go back."""
        for row in range(self.max_seqs) if rows is None else rows:
            for block in self.tables[row]:
                self._drop(block)
            self.tables[row], self.first[row], self.lengths[row] = [], 0, 0

    def truncate(self, row: int, length: int) -> bool:
        """Forget a sequence's positions >= length (to re-feed a changed tail). Impossible once the
        window has evicted a position that the next query (at `length`) sees: returns False then."""
        needed = max(0, length - self.window + 1) if self.window else 0
        if length > self.lengths[row] or needed < self.first[row] * self.block_size:
            return False
        keep = -(-length // self.block_size) - self.first[row]  # blocks holding positions < length
        for block in self.tables[row][keep:]:
            self._drop(block)
        del self.tables[row][keep:]
        if length % self.block_size and keep:  # the last kept block will be written again:
            self._own_last_block(row)
        self.lengths[row] = length
        return True

    def _own_last_block(self, row: int) -> None:
        """Make the row's last block its own before it is written again: a copy when others hold it or
        it is published (shared and cached blocks never change)."""
        block = self.tables[row][-1]
        if self.refs[block] > 1 or block in self.hash_of:
            copy = self._take()
            self.k[:, copy], self.v[:, copy] = self.k[:, block], self.v[:, block]
            self._drop(block)
            self.tables[row][-1] = copy

    # -- one step ----------------------------------------------------------------------------------
    def slot_index(self, rows: list[int], span: int) -> torch.Tensor:
        """[B, span] flat slot index of each row's slots j < span (beyond a row's blocks: its last slot);
        slot j of a row holds position first_pos + j."""
        return self._slot_index(rows, span)

    def _slot_index(self, rows: list[int], span: int) -> torch.Tensor:
        """[B, span] flat slot index of each row's slots j < span (beyond a row's blocks: its last slot)."""
        width = -(-span // self.block_size)
        tables = [t[:width] + [t[-1] if t else 0] * (width - len(t)) for t in (self.tables[r] for r in rows)]
        blocks = torch.tensor(tables, device=self.device)  # [B, width]
        return (blocks[:, :, None] * self.block_size + self._arange).view(len(rows), -1)[:, :span]

    def _flat_slot(self, row: int, position: int) -> int:
        block = self.tables[row][position // self.block_size - self.first[row]]
        return block * self.block_size + position % self.block_size

    def plan(self, seqlens: list[int], rows: list[int] | None = None) -> StepPlan:
        """Plan a step that appends seqlens[i] tokens to sequence rows[i] (rows default to 0..B-1),
        taking the blocks they need (CacheFull when the pool has too few)."""
        _check_seqlens(seqlens)
        rows = list(range(len(seqlens))) if rows is None else list(rows)
        if len(rows) != len(seqlens) or len(set(rows)) != len(rows) or not all(0 <= r < self.max_seqs for r in rows):
            raise InputError(f"rows {rows} must be {len(seqlens)} distinct cache rows in [0, {self.max_seqs})")
        starts = [self.lengths[r] for r in rows]
        for r, start, n in zip(rows, starts, seqlens):
            if self.max_len is not None and start + n > self.max_len:
                raise InputError(f"sequence in cache row {r} would reach {start + n} tokens, "
                                 f"more than the cache holds ({self.max_len})")
        if sum(self.blocks_needed(r, n) for r, n in zip(rows, seqlens)) > self.free_blocks:
            raise CacheFull(f"the step needs more KV cache blocks than the {self.free_blocks} free")
        for r, start, n in zip(rows, starts, seqlens):
            self._grow(r, start + n)
        first_pos = [self.first[r] * self.block_size for r in rows]
        if all(n == 1 for n in seqlens):
            return self._decode_plan(rows, starts, first_pos)
        device = self.device
        starts_t = torch.tensor(starts, device=device)
        q_pos, q_valid, pad_index = _padded_layout(seqlens, starts_t, device)
        cached = [start - f for start, f in zip(starts, first_pos)]  # slots before the chunk
        used = max(cached)
        mask, window = None, None
        if len(seqlens) == 1:
            # One sequence: its cached keys in position order, then the band over them and the chunk's
            # own. Without a sliding window the band spans every key: all cached, the chunk's causally.
            window = self.window or used + seqlens[0]
            span = used + seqlens[0]
        else:
            span = used
            j = torch.arange(used, device=device)
            k_cached = torch.where(j[None, :] < torch.tensor(cached, device=device)[:, None],
                                   torch.tensor(first_pos, device=device)[:, None] + j[None, :], -1)
            mask = _attention_mask(q_pos, torch.cat([k_cached, torch.where(q_valid, q_pos, -1)], dim=1),
                                   q_valid, self.window)
        # Only the last S tokens of each chunk are cached (the window's); the earlier ones need no slot.
        positions = q_pos[q_valid]  # [T]
        keep, dst, offset = [], [], 0
        for r, start, n in zip(rows, starts, seqlens):
            low = max(start, start + n - self.slots)
            keep.extend(range(offset + low - start, offset + n))
            dst.extend(self._flat_slot(r, p) for p in range(low, start + n))
            offset += n
        return StepPlan(positions=positions, pad_index=pad_index, batch=len(seqlens), length=max(seqlens),
                        mask=mask, window=window, used_slots=used,
                        slots=self._slot_index(rows, span) if span else None, first_pos=first_pos,
                        write_src=torch.tensor(keep, device=device), write_dst=torch.tensor(dst, device=device))

    def _decode_plan(self, rows: list[int], starts: list[int], first_pos: list[int]) -> StepPlan:
        """One token per sequence (batched decode): each token's K/V go straight into its slot, then
        attention reads each row's slots, which after the write hold positions first_pos .. p.

        Planned from Python ints (small tensor ops cost ~30 us each here, a token's budget is ~10 ms):
        the mask only marks, per row, its slots from the first position inside the window to its
        newest, and is left out when that is every slot of every row (the common batch-1 decode)."""
        device = self.device
        counts = [p - f + 1 for p, f in zip(starts, first_pos)]  # slots held after the write
        lows = [max(0, p - self.window + 1 - f) if self.window else 0 for p, f in zip(starts, first_pos)]
        used = max(counts)
        mask = None
        if min(counts) < used or max(lows) > 0:  # [B, 1, 1, used]
            j = torch.arange(used, device=device)
            mask = ((j >= torch.tensor(lows, device=device)[:, None])
                    & (j < torch.tensor(counts, device=device)[:, None]))[:, None, None, :]
        positions = torch.tensor(starts, device=device)  # [B]
        write_dst = torch.tensor([self._flat_slot(r, p) for r, p in zip(rows, starts)], device=device)
        return StepPlan(positions=positions, pad_index=None, batch=len(rows), length=1, mask=mask,
                        used_slots=used, slots=self._slot_index(rows, used), first_pos=first_pos,
                        write_src=None, write_dst=write_dst, decode=True)

    def _flat(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[layer].view(-1, *self.k.shape[-2:]), self.v[layer].view(-1, *self.v.shape[-2:])

    def append_and_read(self, layer: int, plan: StepPlan, k: torch.Tensor, v: torch.Tensor):
        """Decode: store k, v [B, n_kv_heads, head_dim] in their slots, then return the rows'
        keys and values [B, n_kv_heads, used_slots, head_dim] (gathered from their blocks)."""
        flat_k, flat_v = self._flat(layer)
        flat_k.index_copy_(0, plan.write_dst, k.to(flat_k.dtype))
        flat_v.index_copy_(0, plan.write_dst, v.to(flat_v.dtype))
        return flat_k[plan.slots].transpose(1, 2), flat_v[plan.slots].transpose(1, 2)

    def keys_values(self, layer: int, plan: StepPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached K and V of the plan's sequences before the step: [B, used_slots, n_kv_heads,
        head_dim] each, in position order."""
        flat_k, flat_v = self._flat(layer)
        if plan.slots is None or not plan.used_slots:
            empty = flat_k.new_empty(plan.batch, 0, *flat_k.shape[1:])
            return empty, empty
        index = plan.slots[:, :plan.used_slots]
        return flat_k[index], flat_v[index]

    def write(self, layer: int, plan: StepPlan, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the step's new k, v ([T, n_kv_heads, head_dim]) of one layer into their slots."""
        flat_k, flat_v = self._flat(layer)
        flat_k.index_copy_(0, plan.write_dst, k[plan.write_src].to(flat_k.dtype))
        flat_v.index_copy_(0, plan.write_dst, v[plan.write_src].to(flat_v.dtype))

    def commit(self, plan: StepPlan, seqlens: list[int], rows: list[int] | None = None) -> None:
        """After all layers ran: advance lengths, and give back the blocks that left the window of
        each row's next query."""
        for r, n in zip(range(len(seqlens)) if rows is None else rows, seqlens):
            self.lengths[r] += n
            if self.window is not None:
                self._forget_before(r, self.lengths[r] - self.window + 1 - self.rollback)

    def nbytes_per_block(self) -> int:
        return 2 * self.k[:, 0].numel() * self.k.element_size()

    def nbytes_per_sequence(self) -> int:
        """Bytes of K/V memory one sequence occupies at its longest (blocks_per_seq blocks)."""
        return self.blocks_per_seq * self.nbytes_per_block()
