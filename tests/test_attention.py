"""Sliding-window attention by query blocks: equal to dense masked attention, and the model to transformers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mistral7b import attention
from mistral7b.cache import plan_without_cache
from test_model_parity import TOL, hf_logits, random_ids


def dense_window_attention(q, k, v, window):
    """The reference: one [L, L] mask with the window rule i - W < j <= i."""
    i = torch.arange(q.shape[2])
    mask = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def qkv(batch, length, seed, heads=4, kv_heads=2, head_dim=8):
    g = torch.Generator().manual_seed(seed)
    shapes = [(batch, heads, length, head_dim)] + [(batch, kv_heads, length, head_dim)] * 2
    return [torch.randn(s, generator=g, requires_grad=True) for s in shapes]


@pytest.mark.parametrize("window", [4, 5, 8])
@pytest.mark.parametrize("block", [1, 3, 4, 8, None])  # None: the default
@pytest.mark.parametrize("length", ["W", "W+1", "3W", "5W+2"])
def test_blocks_equal_dense_mask(window, block, length):
    n = {"W": window, "W+1": window + 1, "3W": 3 * window, "5W+2": 5 * window + 2}[length]
    q, k, v = qkv(2, n, seed=n * 10 + window)
    got = attention.sliding_window_attention(q, k, v, window, block)
    expected = dense_window_attention(q, k, v, window)
    assert (got - expected).abs().max().item() <= 1e-5
    # Training runs backward through the blocks: gradients match too.
    grads = torch.autograd.grad(got.square().sum(), (q, k, v))
    expected_grads = torch.autograd.grad(expected.square().sum(), (q, k, v))
    for g, e in zip(grads, expected_grads):
        assert (g - e).abs().max().item() <= 1e-5


@pytest.mark.parametrize("window", [4, 5, 8])
@pytest.mark.parametrize("length", ["W", "W+1", "2W-1", "3W", "5W+2"])
@torch.no_grad()
def test_exact_band_by_window_blocks_equals_dense_mask(window, length):
    """Inference on the CPU: blocks of W queries, each causal to itself and (reversed) to the W - 1
    keys before it, merged by log-sum-exp; full and shorter last blocks; 4 query heads over 2."""
    n = {"W": window, "W+1": window + 1, "2W-1": 2 * window - 1, "3W": 3 * window, "5W+2": 5 * window + 2}[length]
    q, k, v = (t.detach() for t in qkv(2, n, seed=n * 10 + window))
    got = attention.sliding_window_attention(q, k, v, window)
    assert (got - dense_window_attention(q, k, v, window)).abs().max().item() <= 1e-5
    edge = one_hot_visibility(n, window, block=None)
    for i in range(n):
        assert edge[i] == list(range(max(0, i - window + 1), i + 1)), i


@pytest.mark.parametrize("window", [4, 5, 8])
@pytest.mark.parametrize("cached", [1, 3, "W-1", "W"])  # keys before the queries (a cache's, in order)
@pytest.mark.parametrize("queries", [1, 2, "W-1", "W", "2W+3"])
@pytest.mark.parametrize("block", [3, None])  # the masked blocks (autograd, other devices); the exact band
def test_band_after_cached_keys_equals_dense_mask(window, cached, queries, block):
    """A prefill chunk through a rolling cache: the last Lq of Lk keys are the queries'."""
    sizes = {"W-1": window - 1, "W": window, "2W+3": 2 * window + 3}
    cached, queries = sizes.get(cached, cached), sizes.get(queries, queries)
    q, k, v = (t.detach() for t in qkv(2, cached + queries, seed=cached * 100 + queries * 10 + window))
    expected = dense_window_attention(q, k, v, window)[:, :, cached:]
    got = attention.sliding_window_attention(q[:, :, cached:], k, v, window, block)
    assert (got - expected).abs().max().item() <= 1e-5


def one_hot_visibility(length, window, block):
    """For each query, the keys it attends to: equal scores and one-hot values make them visible."""
    q = torch.zeros(1, 1, length, length)  # head size L, as v's (the fast path needs them equal)
    k = torch.zeros(1, 1, length, length)
    v = torch.eye(length)[None, None]  # [1, 1, L, L]: key j's value is e_j
    out = attention.sliding_window_attention(q, k, v, window, block)[0, 0]
    return [torch.nonzero(out[i] > 0).squeeze(1).tolist() for i in range(length)]


def test_window_edge_at_block_boundaries():
    """One-hot values: the output of query i is exactly the share of each key, so the set of keys it
    sees is visible; it must be i-W+1..i at every block edge."""
    window, block, length = 4, 3, 20
    seen = one_hot_visibility(length, window, block)
    for i in range(length):
        assert seen[i] == list(range(max(0, i - window + 1), i + 1)), i


def test_plan_without_cache_builds_no_dense_mask():
    plan = plan_without_cache([100_000, 3], 4096, torch.device("cpu"))  # a dense mask would be 20 GB
    assert plan.mask is None and plan.window == 4096
    assert plan_without_cache([4096, 3], 4096, torch.device("cpu")).window is None  # no row past W: causal
    assert plan_without_cache([100_000], None, torch.device("cpu")).window is None


@pytest.mark.parametrize("block", [3, 7, None])
@torch.no_grad()
def test_model_equals_transformers_over_five_windows(tiny_pair, block, monkeypatch):
    """Packed rows of different lengths (5 windows, padding at the ends of shorter rows) against
    transformers one sequence at a time, with block sizes that do and do not divide the rows."""
    hf, ours, w = tiny_pair
    if block is not None:
        monkeypatch.setattr(attention, "default_block", lambda window: block)
    lengths = [5 * w, 5 * w - 2, 2, w + 1]
    seqs = [random_ids(n, ours.args.vocab_size, 200 + n) for n in lengths]
    packed = ours(torch.cat(seqs), lengths)
    for seq, got in zip(seqs, packed.split(lengths)):
        assert (got - hf_logits(hf, seq)).abs().max().item() <= TOL
