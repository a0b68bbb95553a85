"""The OpenAI-compatible server: `create_app(engine, tokenizer, ...)` and `kv_rows(...)` sizing."""

from __future__ import annotations

from ..cache import slots_per_sequence
from ..model import Transformer
from .app import create_app

__all__ = ["create_app", "kv_rows"]


def kv_rows(model: Transformer, max_model_len: int | None, kv_cache_gb: float, max_num_seqs: int) -> int:
    """How many sequences fit a KV budget of kv_cache_gb: each holds S slots (the window for
    windowed models, else max_model_len), whatever its length."""
    args = model.args
    slots = slots_per_sequence(args, max_model_len)
    per_seq = 2 * args.n_layers * slots * args.n_kv_heads * args.head_dim * model.cache_dtype.itemsize
    return max(1, min(max_num_seqs, int(kv_cache_gb * 2**30 // per_seq)))
