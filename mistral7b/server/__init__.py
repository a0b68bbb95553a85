"""The OpenAI-compatible server: `create_app(engine, tokenizer, ...)` and `kv_blocks(...)` sizing."""

from __future__ import annotations

from ..cache import DEFAULT_BLOCK_SIZE
from .app import create_app

__all__ = ["create_app", "kv_blocks"]


def kv_blocks(model, kv_cache_gb: float, block_size: int = DEFAULT_BLOCK_SIZE) -> int:
    """How many KV cache blocks fit a budget of kv_cache_gb (the paged cache gives them to the
    tokens that exist, so the budget bounds tokens, not sequences)."""
    args = model.args
    per_block = 2 * args.n_layers * block_size * args.n_kv_heads * args.head_dim * model.cache_dtype.itemsize
    return max(1, int(kv_cache_gb * 2**30 // per_block))
