"""The rolling-buffer cache: W slots per sequence however long it runs, and the window rule at the wrap."""

from __future__ import annotations

import os

import pytest
import torch

import mistral7b
from mistral7b.errors import InputError


@pytest.mark.parametrize("block_size", [1, 2, 3, 32])
@torch.no_grad()
def test_cache_memory_stays_at_window(tiny_model, block_size):
    """A windowed sequence holds at most ceil(W / BS) + 1 blocks however long it runs: the blocks that
    left the window go back to the pool; its logits equal the one-shot pass's all the way."""
    w = tiny_model.args.sliding_window
    cache = tiny_model.new_cache(2, max_len=100_000, block_size=block_size)  # a long context: still W
    assert cache.slots == w
    k_ptr, n_blocks = cache.k.data_ptr(), cache.n_blocks
    ids = torch.randint(0, tiny_model.args.vocab_size, (10 * w,))
    out = [tiny_model(ids[:w + 1], [w + 1], cache)]
    for t in range(w + 1, 10 * w):
        out.append(tiny_model(ids[t:t + 1], [1], cache))
        assert cache.k.data_ptr() == k_ptr and cache.n_blocks == n_blocks  # never reallocated
        assert cache.held_blocks(0) <= -(-w // block_size) + 1
    assert cache.lengths[0] == 10 * w
    assert (torch.cat(out) - tiny_model(ids, [len(ids)])).abs().max().item() < 1e-4
    # The first held block holds the oldest position the next query sees.
    assert cache.first[0] * block_size <= 10 * w - w + 1 < (cache.first[0] + 1) * block_size
    assert cache.held_blocks(1) == 0  # the unused row took nothing
    cache.reset()
    assert cache.free_blocks == cache.n_blocks  # every block back in the pool


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads Linux's /proc")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cache_takes_memory_as_it_is_used(dtype):
    """A cache sized for a long context (here 2 x 512 MiB in fp32) takes resident memory only for
    the blocks written, and its unwritten blocks read as zeros."""
    args = mistral7b.ModelArgs(dim=256, n_layers=8, head_dim=64, hidden_dim=512, n_heads=4, n_kv_heads=4,
                               norm_eps=1e-5, vocab_size=32)
    before = _resident_bytes()
    cache = mistral7b.KVCache(args, max_seqs=1, max_len=65536, dtype=dtype)
    assert cache.k.nbytes >= 2**28 and cache.k.dtype == dtype and cache.k.shape[1] == cache.n_blocks
    assert _resident_bytes() - before < 2**27
    assert not cache.k[:, -1].any() and not cache.v[:, :2].any()


@torch.no_grad()
def test_window_rule_at_wrap_around(tiny_model):
    """A query at position i sees exactly keys i-W+1..i: changing the token at i-W changes nothing at
    i in layer 0's view, so with one layer the logits at i ignore it; the token at i-W+1 matters."""
    args = mistral7b.ModelArgs(**{**tiny_model.args.__dict__, "n_layers": 1})
    model = mistral7b.Transformer(args).eval()
    w = args.sliding_window
    ids = torch.randint(0, args.vocab_size, (3 * w,), generator=torch.Generator().manual_seed(1))
    i = 2 * w + 1
    base = model(ids, [len(ids)])[i]
    outside = ids.clone()
    outside[i - w] = (outside[i - w] + 1) % args.vocab_size
    inside = ids.clone()
    inside[i - w + 1] = (inside[i - w + 1] + 1) % args.vocab_size
    assert torch.equal(model(outside, [len(ids)])[i], base)
    assert not torch.allclose(model(inside, [len(ids)])[i], base)
    # Same through the rolling cache, token by token.
    cache = model.new_cache(1)
    steps = [model(outside[t:t + 1], [1], cache) for t in range(i + 1)]
    assert torch.allclose(steps[-1][0], base, atol=1e-5)


@pytest.mark.parametrize("block_size", [2, 32])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("chunk", [1, 3, 7, 16])
@torch.no_grad()
def test_chunked_prefill_of_one_sequence_equals_one_shot(window, chunk, block_size):
    """One sequence's chunks attend to the cached keys in position order with no mask (attention.py's
    band; without a window, one spanning every key): each chunk's logits equal the one-shot pass's."""
    from conftest import make_tiny_model

    model = make_tiny_model(sliding_window=window)
    ids = torch.randint(0, model.args.vocab_size, (23,), generator=torch.Generator().manual_seed(3))
    cache = model.new_cache(1, max_len=None if window else 32, block_size=block_size)
    pieces = [model(ids[i:i + chunk], [len(ids[i:i + chunk])], cache) for i in range(0, len(ids), chunk)]
    assert (torch.cat(pieces) - model(ids, [len(ids)])).abs().max().item() < 1e-4


def test_full_attention_cache_refuses_to_overflow():
    args = mistral7b.ModelArgs(dim=32, n_layers=1, head_dim=8, hidden_dim=64, n_heads=4, n_kv_heads=4,
                               norm_eps=1e-5, vocab_size=50)
    model = mistral7b.Transformer(args)
    cache = model.new_cache(1, max_len=8)
    model(torch.zeros(6, dtype=torch.long), [6], cache)
    with pytest.raises(InputError, match="more than the cache holds"):
        model(torch.zeros(3, dtype=torch.long), [3], cache)


def test_cache_reset_reuses_rows(tiny_model):
    cache = tiny_model.new_cache(2)
    ids = torch.arange(10) % tiny_model.args.vocab_size
    first = tiny_model(ids, [10], cache, rows=[1])
    cache.reset([1])
    assert cache.lengths[1] == 0 and cache.held_blocks(1) == 0 and cache.free_blocks == cache.n_blocks
    again = tiny_model(ids, [10], cache, rows=[1])
    assert torch.equal(first, again)


@pytest.mark.parametrize("window", [None, 5])
@torch.no_grad()
def test_attached_prefix_continues_like_a_full_prefill(window):
    """A second sequence attached to the first's published blocks (prefix sharing) and fed only the
    rest of its prompt gives the logits of feeding it all; the shared blocks are never written, and
    with a window only the blocks the next position sees are needed (earlier ones evicted)."""
    from conftest import make_tiny_model

    model = make_tiny_model(sliding_window=window)
    bs = 2
    cache = model.new_cache(3, max_len=None if window else 64, block_size=bs)
    ids = torch.randint(0, model.args.vocab_size, (17,), generator=torch.Generator().manual_seed(5))
    model(ids[:12], [12], cache, rows=[0])
    hashes = [hash(tuple(ids[:(b + 1) * bs].tolist())) for b in range(12 // bs)]  # stand-ins for the engine's
    for b, h in enumerate(hashes):
        cache.publish(0, b, h)
    first, blocks = cache.lookup(hashes)
    want_first = max(0, 12 - window + 1) // bs if window else 0
    assert first == want_first and len(blocks) == 12 // bs - first
    assert cache.attach(1, first, blocks) == 12
    shared = cache.k[:, blocks].clone()
    got = model(ids[12:], [5], cache, rows=[1])
    assert torch.equal(cache.k[:, blocks], shared)  # read, never written
    want = model(ids, [17])[12:]
    assert (got - want).abs().max().item() < 1e-4
    cache.reset([0, 1])
    assert cache.free_blocks == cache.n_blocks and cache.used_blocks == 0
    # Still cached when nobody holds them, until the pool needs them: a third row finds them again.
    assert cache.lookup(hashes)[1] == blocks
    cache.truncate(2, 0)
    cache.attach(2, first, blocks)
    # Into a published block: the row takes its own copy, the cached one stays. With a window, position
    # 11's query needs position 7, whose block was never attached: impossible.
    assert cache.truncate(2, 12 - 1) == (window is None)
    assert cache.lookup(hashes)[1] == blocks and (window or cache.tables[2][-1] not in blocks)
