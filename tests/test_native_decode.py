"""The runner's native routes (kernels.decode_step, decode.cpp) against its eager ones.

Both run the same GEMV kernels, so on fp32 models they agree to float rounding; the cases cover
what decode touches: the rolling cache across several window wraps, batched rows of different lengths
(a mask), a full-attention cache, bf16 models and caches, int8 / int4 layers, and every condition
under which the runner must take the eager blocks.
"""

import copy

import pytest
import torch

from conftest import make_tiny_model
from mistral7b import kernels
from mistral7b.lora import LoRAConfig, apply_lora
from mistral7b.engine import Engine, Request
from mistral7b.runner import Route, Runner, choose_route
from mistral7b.sampling import SamplingParams
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


def both_paths(model, **kwargs):
    """(native, eager) logits of the same decode run (or, with `chunks`, pre-fill run)."""
    run = chunked_logits if "chunks" in kwargs else decode_logits
    with torch.no_grad():
        return run(Runner(model), **kwargs), run(Runner(model, native=False), **kwargs)


def native_calls(monkeypatch) -> list:
    calls = []
    real = kernels.decode_step
    monkeypatch.setattr(kernels, "decode_step", lambda *a: calls.append(1) or real(*a))
    return calls


@pytest.mark.parametrize("window,max_len", [(4, None), (7, None), (None, 64)])
def test_fp32_equals_eager_across_wraps_and_masks(monkeypatch, window, max_len):
    calls = native_calls(monkeypatch)
    native, eager = both_paths(tiny(window), max_len=max_len)
    assert calls, "the native step did not run"
    assert (native - eager).abs().max().item() < 1e-4


def test_grouped_heads_and_wide_head_dim(monkeypatch):
    model = tiny(7, dim=48, head_dim=24, hidden_dim=96, n_heads=4, n_kv_heads=1, n_layers=3)
    native, eager = both_paths(model)
    assert (native - eager).abs().max().item() < 1e-4


def test_long_rows_split_over_threads_with_a_mask(monkeypatch):
    """Rows long enough (>= 64 slots) that attention cuts their slots into ranges merged afterwards,
    in batches whose rows have different lengths (a mask) and alone."""
    model = tiny(None, dim=48, head_dim=24, hidden_dim=96, n_heads=4, n_kv_heads=1)
    native, eager = both_paths(model, lengths=(70, 3), steps=30, max_len=256)
    assert (native - eager).abs().max().item() < 1e-4


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("wide", [False, True])  # rows of 2 groups of 32; of 10 and 18 (vector group tails)
def test_quantized_equals_eager(monkeypatch, mode, wide):
    model = tiny(dim=320, head_dim=80, hidden_dim=576) if wide else tiny()
    native, eager = both_paths(quantize(model, mode, 32 if wide else None))
    # Same kernels; only the quantized activations' rounding of slightly different inputs differs (an
    # int8 activation that rounds the other way moves by a whole step: ~0.3% of the logits on wide rows).
    assert ((native - eager).norm() / eager.norm()).item() < (1e-3 if mode == "int8" else 1e-2)


def test_bf16_model_and_cache(monkeypatch):
    model = tiny().to(torch.bfloat16)
    native, eager = both_paths(model)
    # The native step keeps the residual stream in fp32 and rounds once per step; eager rounds per op.
    assert ((native - eager).norm() / eager.norm()).item() < 2e-2


def chunked_logits(model, chunks, max_len=None):
    """One sequence pre-filled chunk by chunk through a cache (the engine's path for one prompt)."""
    cache = model.new_cache(1, max_len)
    ids = torch.randint(0, model.args.vocab_size, (sum(chunks),), generator=torch.Generator().manual_seed(2))
    pieces = ids.split(list(chunks))
    return torch.cat([model(piece, [len(piece)], cache) for piece in pieces])


@pytest.mark.parametrize("mode", [None, "int8", "int4"])
def test_short_prefill_chunks_run_natively_past_the_window(monkeypatch, mode):
    """A chunk of one sequence (<= GEMV_MAX_ROWS tokens) runs as that many rows of the native step,
    each seeing the cached slots in its window and the chunk's own, also once the sequence has
    passed W (blocks out of the window gone back to the pool)."""
    model = tiny(16)
    model = quantize(model, mode) if mode else model
    chunks = (5, 3, 7, 9, 14)  # past 16 (W) after the fourth
    calls = native_calls(monkeypatch)
    native, eager = both_paths(model, chunks=chunks)
    assert len(calls) == 5
    # The same kernels. Quantized models cache in fp16, which the native step reads back for the chunk's
    # own keys too (eager attends to them unrounded); int4's int8 activations then flip some rounding.
    assert ((native - eager).norm() / eager.norm()).item() < {None: 1e-5, "int8": 1e-3, "int4": 2e-2}[mode]
    full = both_paths(tiny(None), chunks=(6, 20), max_len=64)  # no window: until max_len
    assert ((full[0] - full[1]).norm() / full[1].norm()).item() < 1e-5


def prompt_logprobs(model, ids, native=True):
    """The engine's log-probabilities of a lone prompt's tokens (its pre-fill, chunked as the engine likes)."""
    engine = Engine(Runner(model, native=native), max_num_seqs=1, max_model_len=len(ids) + 1)
    engine.add_request(Request(ids.tolist(), SamplingParams(max_tokens=1, prompt_logprobs=0)))
    outs = [out for _ in range(len(ids)) if engine.has_work for out in engine.step()]
    return torch.tensor([e.logprob for e in outs[0].prompt_logprobs[1:]])  # the first token has none


def test_engine_cuts_a_lone_prompt_into_native_chunks(monkeypatch):
    """A lone prompt of GEMV_MAX_ROWS < T <= NATIVE_PREFILL_TOKENS tokens is scheduled as native chunks
    of GEMV_MAX_ROWS (the runner's preferred chunk); its logits equal one eager chunk's."""
    from mistral7b.runner import NATIVE_PREFILL_TOKENS
    model = tiny(None)
    T = 2 * kernels.GEMV_MAX_ROWS - 6
    assert T <= NATIVE_PREFILL_TOKENS[torch.float32]
    ids = torch.randint(0, model.args.vocab_size, (T,), generator=torch.Generator().manual_seed(4))
    calls = native_calls(monkeypatch)
    native = prompt_logprobs(model, ids)
    assert len(calls) == 2
    calls.clear()
    eager = prompt_logprobs(model, ids, native=False)
    assert not calls and native.shape == eager.shape == (T - 1,)
    assert (native - eager).abs().max().item() < 1e-4
    runner, cache = Runner(model), model.new_cache(1, 128)
    assert runner.preferred_chunk(cache, 0, T) == kernels.GEMV_MAX_ROWS
    assert runner.preferred_chunk(cache, 0, NATIVE_PREFILL_TOKENS[torch.float32] + 1) is None  # one eager chunk
    assert Runner(model, native=False).preferred_chunk(cache, 0, T) is None


def test_output_rows_in_any_order_on_both_routes():
    model = tiny(None)
    ids = torch.randint(0, model.args.vocab_size, (20,), generator=torch.Generator().manual_seed(4))
    wanted = torch.tensor([19, 3, 7, 7, 0])
    with torch.no_grad():
        native = Runner(model)(ids, [20], model.new_cache(1, 64), output_rows=wanted)
        eager = Runner(model, native=False)(ids, [20], model.new_cache(1, 64), output_rows=wanted)
    assert native.shape == eager.shape == (5, model.args.vocab_size)
    assert ((native - eager).norm() / eager.norm()).item() < 1e-5


def test_falls_back_where_it_cannot_run(monkeypatch):
    calls = native_calls(monkeypatch)
    model = tiny()
    with torch.no_grad():
        decode_logits(model, steps=2)  # the model itself: the reference blocks
        assert not calls
        decode_logits(Runner(model), steps=2)
        assert calls
        calls.clear()
        lora = apply_lora(copy.deepcopy(model), LoRAConfig(rank=2))  # wrapped projections
        decode_logits(Runner(lora), steps=2)
        assert not calls
        decode_logits(Runner(model), lengths=[3] * (kernels.GEMV_MAX_ROWS + 1), steps=1)  # any number of rows:
        assert len(calls) == 3  # the pre-fill of 33 rows, their decode and the one-row step, all native
    calls.clear()
    decode_logits(Runner(model), steps=1)  # autograd on
    assert not calls


def test_route_is_chosen_once_from_the_plan():
    model = tiny(4)
    cache = model.new_cache(2)
    chunk = cache.plan([3], [0])
    assert choose_route(chunk, cache, True) is Route.NATIVE_CHUNK
    assert choose_route(chunk, cache, False) is Route.EAGER_BAND
    assert choose_route(cache.plan([3, 2], [0, 1]), cache, True) is Route.NATIVE_CHUNK  # several sequences' chunks
    assert choose_route(cache.plan([3, 1], [0, 1]), cache, False) is Route.EAGER_MASKED
    assert choose_route(cache.plan([5, 1], [0, 1]), cache, True) is Route.EAGER_MASKED  # 5 > W slots
    assert choose_route(cache.plan([1, 1], [0, 1]), cache, False) is Route.EAGER_DECODE
    assert choose_route(cache.plan([1], [0]), cache, True) is Route.NATIVE_DECODE
    assert choose_route(cache.plan([5], [0]), cache, True) is Route.EAGER_BAND  # 5 > W slots: it would wrap


def test_a_cast_is_never_run_stale(monkeypatch):
    """A cast replaces the weights the fused projections were built from: the runner rebuilds them,
    so the native step runs the cast weights (as the eager blocks of the cast model compute)."""
    model = tiny()
    with torch.no_grad():
        decode_logits(Runner(model), steps=1)
        calls = native_calls(monkeypatch)
        model.to(torch.bfloat16)
        native = decode_logits(Runner(model), steps=3)
        assert calls
        eager = decode_logits(model, steps=3)
    assert ((native - eager).norm() / eager.norm()).item() < 2e-2


@pytest.mark.parametrize("native", [True, False])
def test_a_replaced_weight_gives_the_new_result(native):
    """Replacing a projection's weight (a new Parameter, as a loader or an edit does) after the runner
    fused and ran the model: the next step computes with the new weight, on both routes."""
    model = tiny(None)
    runner = Runner(model, native=native)
    ids = torch.tensor([3, 1, 4, 1, 5])
    with torch.no_grad():
        runner(ids, [5], model.new_cache(1, 16))
        wk = model.layers[1].attention.wk
        wk.weight = torch.nn.Parameter(torch.randn_like(wk.weight) * 0.1)
        model.layers[0].feed_forward.w3.weight.data = torch.randn_like(model.layers[0].feed_forward.w3.weight) * 0.1
        got = runner(ids, [5], model.new_cache(1, 16))
        want = model(ids, [5], model.new_cache(1, 16))
    assert ((got - want).norm() / want.norm()).item() < 1e-5


def test_bad_rows_get_the_plans_error_not_an_index_error():
    from mistral7b.errors import InputError
    model = tiny(None)
    ids = torch.arange(2 * kernels.GEMV_MAX_ROWS) % model.args.vocab_size
    with torch.no_grad(), pytest.raises(InputError, match="rows"):
        Runner(model)(ids, [len(ids)], model.new_cache(2, 128), rows=[5])
