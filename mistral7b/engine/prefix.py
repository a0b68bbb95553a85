"""Hashes that name full KV cache blocks by their tokens and every token before them.

Block b of a sequence holds positions [b * BS, (b + 1) * BS); its hash chains the hash of block
b - 1 with block b's token ids, so two sequences share a block's hash only when they agree on every
token up to its end, and so hold the same keys and values there (the cache serves one model). The
chain starts from a salt: the engine's, so that caches made for different models or adapters never
answer each other even if they were ever shared.
"""

from __future__ import annotations


def extend_hashes(hashes: list[int], tokens: list[int], block_size: int, salt: int = 0) -> list[int]:
    """Append to `hashes` (the chain of tokens' first len(hashes) blocks) the hashes of every further
    full block of `tokens`; returns `hashes`."""
    for b in range(len(hashes), len(tokens) // block_size):
        previous = hashes[-1] if hashes else salt
        hashes.append(hash((previous, *tokens[b * block_size:(b + 1) * block_size])))
    return hashes
