"""Deterministic few-shot examples: the same seed, document and pool always give the same shots."""

from __future__ import annotations

import random


def sample_shots(pool: list[dict], k: int, seed: int, key: str, exclude: dict | None = None) -> list[dict]:
    """k examples of `pool` drawn by a generator seeded from (seed, key), never `exclude` itself
    (when the pool is the evaluated split). `key` names the document, so adding or limiting other
    documents does not change its shots."""
    if k <= 0:
        return []
    candidates = [d for d in pool if d is not exclude and d != exclude]
    rng = random.Random(f"{seed}:{key}")
    return rng.sample(candidates, min(k, len(candidates)))
