"""The native decode step (kernels.decode_step, decode.cpp) against the eager torch blocks.

Both paths run the same GEMV kernels, so on fp32 models they agree to float rounding; the cases cover
what decode touches: the rolling cache across several window wraps, batched rows of different lengths
(a mask), a full-attention cache, bf16 models and caches, int8 / int4 layers, and every condition
under which the model must fall back to the eager blocks.
"""

import copy

import pytest
import torch

from conftest import make_tiny_model
from mistral7b import kernels
from mistral7b.lora import LoRAConfig, apply_lora
from mistral7b.model import Transformer
from mistral7b.quant import quantize

needs_native = pytest.mark.skipif(not kernels.native_available(), reason="native kernels unavailable")
pytestmark = needs_native


def tiny(window=4, **overrides):
    return make_tiny_model(sliding_window=window, **overrides)


def decode_logits(model, lengths=(5, 2, 9), steps=14, max_len=None):
    """Pre-fill rows of different lengths, then decode all rows together and one row alone."""
    cache = model.new_cache(len(lengths), max_len)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, model.args.vocab_size, (n,), generator=gen) for n in lengths]
    out = [model(torch.cat(prompts), list(lengths), cache)]
    for _ in range(steps):
        tokens = torch.randint(0, model.args.vocab_size, (len(lengths),), generator=gen)
        out.append(model(tokens, [1] * len(lengths), cache))
        out.append(model(tokens[1:2], [1], cache, rows=[1]))
    return torch.cat(out)


def both_paths(model, monkeypatch, **kwargs):
    """(native, eager) logits of the same decode run."""
    model.fuse_projections()
    with torch.no_grad():
        native = decode_logits(model, **kwargs)
        with monkeypatch.context() as m:
            m.setattr(Transformer, "_native_decode", lambda *a: None)
            eager = decode_logits(model, **kwargs)
    return native, eager


def native_calls(monkeypatch) -> list:
    calls = []
    real = kernels.decode_step
    monkeypatch.setattr(kernels, "decode_step", lambda *a: calls.append(1) or real(*a))
    return calls


@pytest.mark.parametrize("window,max_len", [(4, None), (7, None), (None, 64)])
def test_fp32_equals_eager_across_wraps_and_masks(monkeypatch, window, max_len):
    calls = native_calls(monkeypatch)
    native, eager = both_paths(tiny(window), monkeypatch, max_len=max_len)
    assert calls, "the native step did not run"
    assert (native - eager).abs().max().item() < 1e-4


def test_grouped_heads_and_wide_head_dim(monkeypatch):
    model = tiny(7, dim=48, head_dim=24, hidden_dim=96, n_heads=4, n_kv_heads=1, n_layers=3)
    native, eager = both_paths(model, monkeypatch)
    assert (native - eager).abs().max().item() < 1e-4


def test_long_rows_split_over_threads_with_a_mask(monkeypatch):
    """Rows long enough (>= 64 slots) that attention cuts their slots into ranges merged afterwards,
    in batches whose rows have different lengths (a mask) and alone."""
    model = tiny(None, dim=48, head_dim=24, hidden_dim=96, n_heads=4, n_kv_heads=1)
    native, eager = both_paths(model, monkeypatch, lengths=(70, 3), steps=30, max_len=256)
    assert (native - eager).abs().max().item() < 1e-4


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("wide", [False, True])  # rows of 2 groups of 32; of 10 and 18 (vector group tails)
def test_quantized_equals_eager(monkeypatch, mode, wide):
    model = tiny(dim=320, head_dim=80, hidden_dim=576) if wide else tiny()
    native, eager = both_paths(quantize(model, mode, 32 if wide else None), monkeypatch)
    # Same kernels; only the quantized activations' rounding of slightly different inputs differs (an
    # int8 activation that rounds the other way moves by a whole step: ~0.3% of the logits on wide rows).
    assert ((native - eager).norm() / eager.norm()).item() < (1e-3 if mode == "int8" else 1e-2)


def test_bf16_model_and_cache(monkeypatch):
    model = tiny().to(torch.bfloat16)
    native, eager = both_paths(model, monkeypatch)
    # The native step keeps the residual stream in fp32 and rounds once per step; eager rounds per op.
    assert ((native - eager).norm() / eager.norm()).item() < 2e-2


def test_falls_back_where_it_cannot_run(monkeypatch):
    calls = native_calls(monkeypatch)
    model = tiny()
    with torch.no_grad():
        decode_logits(model, steps=2)  # never fused: the eager blocks
        assert not calls
        model.fuse_projections()
        decode_logits(model, steps=2)
        assert calls
        calls.clear()
        lora = apply_lora(copy.deepcopy(model), LoRAConfig(rank=2))  # wrapped projections
        decode_logits(lora, steps=2)
        assert not calls
        decode_logits(model, lengths=[3] * (kernels.GEMV_MAX_ROWS + 1), steps=1)  # too many rows...
        assert len(calls) == 1  # ...but the one-row step that follows is native
    calls.clear()
    decode_logits(model, steps=1)  # autograd on
    assert not calls


def test_cast_after_fusing_falls_back_then_refuses_stale_weights(monkeypatch):
    """A cast replaces the parts' weights: the fused copies are stale, so the eager unfused path runs."""
    model = tiny().fuse_projections()
    with torch.no_grad():
        decode_logits(model, steps=1)
        calls = native_calls(monkeypatch)
        model.to(torch.bfloat16)
        native = decode_logits(model, steps=3)
        assert not calls
        model.fuse_projections()
        refused = decode_logits(model, steps=3)
        assert calls
    assert ((native - refused).norm() / refused.norm()).item() < 2e-2
