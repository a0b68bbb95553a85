"""The timing every engine shares, and what its weights and cache cost in bytes.

Every engine runs the same greedy workload: a warm-up, then `repeat` timed passes; each pass feeds
prompts[0] and decodes `decode_tokens` more tokens after the first (batch 1), then feeds all the
prompts together and decodes as many tokens each (batch N). The first token's time is the prefill;
the decode rate counts only the tokens after it. Medians over the passes are reported.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

# A pass: (prompts, tokens to decode after the first) -> (seconds to every first token, decode seconds).
Pass = Callable[[list[list[int]], int], tuple[float, float]]


class Skipped(Exception):
    """This engine cannot run here (not installed, cannot read the file): a row, not a crash."""


def measure(run_pass: Pass, prompts: list[list[int]], decode_tokens: int, repeat: int) -> dict:
    """Warm up, then time `repeat` passes at batch 1 and batch len(prompts); medians."""
    for batch in (prompts[:1], prompts):
        run_pass(batch, 2)
    runs: dict[str, list[float]] = {"prefill_tok_s": [], "decode_b1_tok_s": [], "decode_bn_tok_s": []}
    for _ in range(repeat):
        first, decode = run_pass(prompts[:1], decode_tokens)
        runs["prefill_tok_s"].append(len(prompts[0]) / first)
        runs["decode_b1_tok_s"].append(decode_tokens / decode)
        _, decode = run_pass(prompts, decode_tokens)
        runs["decode_bn_tok_s"].append(len(prompts) * decode_tokens / decode)
    return {k: statistics.median(v) for k, v in runs.items()}


def weight_bytes(model, embedding) -> tuple[int, int]:
    """(bytes of every weight, bytes one decoded token reads) of a torch model: all of them but the
    `embedding` table, of which a token gathers one row (a tied output projection reads it whole).
    Weights are the state dict's tensors (a tied table once), not scratch buffers such as RoPE's."""
    prefix = next(name for name, module in model.named_modules() if module is embedding) + "."
    named = model.state_dict(keep_vars=True)
    table = embedding.weight

    def unique_bytes(tensors) -> int:
        return sum(t.nbytes for t in {id(t): t for t in tensors}.values())

    read = unique_bytes(t for name, t in named.items() if not name.startswith(prefix))
    return unique_bytes(named.values()), read + table.nbytes // table.shape[0]


def kv_bytes_per_position(n_layers: int, n_kv_heads: int, head_dim: int, element_size: int) -> int:
    """Bytes of keys and values one cached position holds across the layers (a decode step reads
    this much per position it attends to)."""
    return 2 * n_layers * n_kv_heads * head_dim * element_size


def set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def measure_bandwidth(threads: int, nbytes: int) -> float:
    """Memory read speed in GB/s (1e9 bytes): the best of several sums of an fp32 tensor of `nbytes`."""
    import torch

    set_threads(threads)
    x = torch.ones(nbytes // 4)
    x.sum()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return x.nbytes / best / 1e9
