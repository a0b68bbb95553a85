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
    """(native, eager) logits of the same decode run (or, with `chunks`, pre-fill run)."""
    model.fuse_projections()
    run = chunked_logits if "chunks" in kwargs else decode_logits
    with torch.no_grad():
        native = run(model, **kwargs)
        with monkeypatch.context() as m:
            m.setattr(Transformer, "_native_decode", lambda *a: None)
            eager = run(model, **kwargs)
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


def chunked_logits(model, chunks, max_len=None):
    """One sequence pre-filled chunk by chunk through a cache (the engine's path for one prompt)."""
    cache = model.new_cache(1, max_len)
    ids = torch.randint(0, model.args.vocab_size, (sum(chunks),), generator=torch.Generator().manual_seed(2))
    pieces = ids.split(list(chunks))
    return torch.cat([model(piece, [len(piece)], cache) for piece in pieces])


@pytest.mark.parametrize("mode", [None, "int8", "int4"])
def test_short_prefill_chunks_run_natively_until_the_buffer_wraps(monkeypatch, mode):
    """A chunk of one sequence (<= GEMV_MAX_ROWS tokens) runs as that many rows of the native step,
    each causal to the slots before it, while the rolling buffer has not wrapped; then eagerly."""
    model = tiny(16)
    model = quantize(model, mode) if mode else model
    chunks = (5, 3, 7, 9)  # the last one crosses slot 16 (W): the buffer wraps, eager blocks
    calls = native_calls(monkeypatch)
    native, eager = both_paths(model, monkeypatch, chunks=chunks)
    assert len(calls) == 3
    # The same kernels. Quantized models cache in fp16, which the native step reads back for the chunk's
    # own keys too (eager attends to them unrounded); int4's int8 activations then flip some rounding.
    assert ((native - eager).norm() / eager.norm()).item() < {None: 1e-5, "int8": 1e-3, "int4": 2e-2}[mode]
    full = both_paths(tiny(None), monkeypatch, chunks=(6, 20), max_len=64)  # no window: until max_len
    assert ((full[0] - full[1]).norm() / full[1].norm()).item() < 1e-5


def test_longer_prefill_runs_as_native_pieces_with_any_output_rows(monkeypatch):
    """A one-sequence pre-fill of GEMV_MAX_ROWS < T <= NATIVE_PREFILL_TOKENS tokens runs as native
    chunks of GEMV_MAX_ROWS; the logits asked for come back in the order asked, duplicates too."""
    from mistral7b.model import NATIVE_PREFILL_TOKENS
    model = tiny(None).fuse_projections()
    T = 2 * kernels.GEMV_MAX_ROWS - 6
    assert T <= NATIVE_PREFILL_TOKENS[torch.float32]
    ids = torch.randint(0, model.args.vocab_size, (T,), generator=torch.Generator().manual_seed(4))
    calls = native_calls(monkeypatch)
    for wanted in (None, torch.tensor([T - 1, 3, 40, 40, 0])):  # 40: the second piece
        with torch.no_grad():
            native = model(ids, [T], model.new_cache(1, 128), output_rows=wanted)
            assert len(calls) == 2
            calls.clear()
            with monkeypatch.context() as m:  # one eager chunk
                m.setattr(Transformer, "_native_decode", lambda *a: None)
                m.setattr(Transformer, "_prefill_in_native_pieces", lambda *a: None)
                eager = model(ids, [T], model.new_cache(1, 128), output_rows=wanted)
        assert native.shape == eager.shape == (T if wanted is None else len(wanted), model.args.vocab_size)
        assert ((native - eager).norm() / eager.norm()).item() < 1e-5


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


def test_bad_rows_get_the_plans_error_not_an_index_error():
    from mistral7b.errors import InputError
    model = tiny(None).fuse_projections()
    ids = torch.arange(2 * kernels.GEMV_MAX_ROWS) % model.args.vocab_size
    with torch.no_grad(), pytest.raises(InputError, match="rows"):
        model(ids, [len(ids)], model.new_cache(2, 128), rows=[5])
