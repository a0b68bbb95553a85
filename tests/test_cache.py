"""The rolling-buffer cache: W slots per sequence however long it runs, and the window rule at the wrap."""

from __future__ import annotations

import pytest
import torch

import mistral7b
from mistral7b.errors import InputError


@torch.no_grad()
def test_cache_memory_stays_at_window(tiny_model):
    w = tiny_model.args.sliding_window
    cache = tiny_model.new_cache(2, max_len=100_000)  # asking for a long context still gives W slots
    assert cache.slots == w
    per_seq = cache.nbytes_per_sequence()
    k_ptr = cache.k.data_ptr()
    ids = torch.randint(0, tiny_model.args.vocab_size, (10 * w,))
    tiny_model(ids[:w + 1], [w + 1], cache)
    for t in range(w + 1, 10 * w):
        tiny_model(ids[t:t + 1], [1], cache)
        assert cache.k.shape[2] == w and cache.k.data_ptr() == k_ptr  # never reallocated
    assert cache.nbytes_per_sequence() == per_seq
    assert cache.lengths[0] == 10 * w
    # The slots hold exactly the last W positions, each in slot p % W.
    held = cache.slot_pos[0].tolist()
    assert sorted(held) == list(range(9 * w, 10 * w))
    assert all(p % w == slot for slot, p in enumerate(held))
    assert cache.slot_pos[1].eq(-1).all()  # the unused row stayed empty


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


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("chunk", [1, 3, 7, 16])
@torch.no_grad()
def test_chunked_prefill_of_one_sequence_equals_one_shot(window, chunk):
    """One sequence's chunks attend to the cached keys in position order with no mask (attention.py's
    band; without a window, one spanning every key): each chunk's logits equal the one-shot pass's."""
    from conftest import make_tiny_model

    model = make_tiny_model(sliding_window=window)
    ids = torch.randint(0, model.args.vocab_size, (23,), generator=torch.Generator().manual_seed(3))
    cache = model.new_cache(1, max_len=None if window else 32)
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
    assert cache.lengths[1] == 0 and cache.slot_pos[1].eq(-1).all()
    again = tiny_model(ids, [10], cache, rows=[1])
    assert torch.equal(first, again)
