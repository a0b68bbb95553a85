"""Weight-only int8/int4 models: quantize(), load(quantize=...), GGUF blocks kept packed, the CLI flag."""

from __future__ import annotations

import math

import pytest
import torch
from gguf import GGMLQuantizationType as Q
from test_cli import run_cli, tiny_folder  # noqa: F401 (a fixture)
from test_gguf import ggml, ggml_dequantize, ggml_quantize, write_gguf

import mistral7b
from mistral7b import kernels
from mistral7b.errors import InputError
from mistral7b.quant import Int4Linear, Int8Linear, QuantLinear, quantize, quantized_mode
from mistral7b.runner import Runner, execution_of
from mistral7b.weights.gguf_quant import pack

TEXT = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named "
        "after the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889. "
        "Locally nicknamed the Iron Lady, it was constructed as the centrepiece of the 1889 World's Fair.")


def copy_of(model):
    clone = mistral7b.Transformer(model.args).eval()
    clone.load_state_dict(model.state_dict())
    return clone


def decode_perplexity(model, ids: torch.Tensor) -> float:
    """Perplexity of ids fed one token at a time through a KV cache (the engine's decode path)."""
    runner, cache = Runner(model), model.new_cache(1, len(ids))
    with torch.inference_mode():
        logits = torch.cat([runner(ids[i:i + 1], [1], cache) for i in range(len(ids))])
    return math.exp(torch.nn.functional.cross_entropy(logits[:-1], ids[1:]).item())


# Random tiny models amplify weight error (int4 rounds each weight by ~8% RMS); SmolLM2 is the real bar below.
@pytest.mark.parametrize("mode,group_size,tolerance", [("int8", None, 0.02), ("int8", 32, 0.02), ("int4", 32, 0.35),
                                                       ("int4", 64, 0.45)])
@torch.no_grad()
def test_quantized_model_stays_close(tiny_model, mode, group_size, tolerance):
    model = quantize(copy_of(tiny_model), mode, group_size)
    layer = Int8Linear if mode == "int8" else Int4Linear
    assert all(isinstance(m, layer) for m in model.modules() if isinstance(m, QuantLinear))
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    assert isinstance(model.tok_embeddings, torch.nn.Embedding) and quantized_mode(model) == mode
    ids = torch.randint(0, 128, (40,), generator=torch.Generator().manual_seed(0))
    ref, out = tiny_model(ids, [40]), model(ids, [40])
    assert ((out - ref).norm() / ref.norm()).item() < tolerance
    # Decode through the engine's path (fused projections, cache, batch-1 GEMV) equals one-shot up
    # to the GEMV's rounding of the activations: int16 for int8 weights (measured 5e-5 of the logit
    # range), int8 per 32 for int4 (~0.5% per GEMV, compounding: measured 1.3% at G32, 2.2% at G64).
    runner, cache = Runner(model), model.new_cache(1, 64)
    steps = [runner(ids[:30], [30], cache)[-1:]] + [runner(ids[i:i + 1], [1], cache) for i in range(30, 40)]
    rtol = 1e-3 if mode == "int8" else 3e-2
    assert torch.allclose(torch.cat(steps), out[29:], atol=rtol * out.abs().max().item())


@torch.no_grad()
def test_quantized_models_cache_keys_in_fp16_unless_told(tiny_model, tiny_folder):
    # int8 (int16 activations): int4's int8 activations flip their rounding under any perturbation.
    model = quantize(copy_of(tiny_model), "int8")
    runner = Runner(model)
    assert tiny_model.new_cache(1, 8).k.dtype == torch.float32
    assert model.new_cache(1, 8).k.dtype == torch.float16 == model.new_cache(1, 8).v.dtype
    ids = torch.randint(0, 128, (24,), generator=torch.Generator().manual_seed(3))

    def decode(cache):  # a chunk, then token by token past the window (4): reads the cache both ways
        return torch.cat([runner(ids[:9], [9], cache)[-1:]] + [runner(ids[i:i + 1], [1], cache) for i in range(9, 24)])

    half = decode(model.new_cache(1, 64))
    model.kv_cache_dtype = torch.float32
    full = decode(model.new_cache(1, 64))
    assert model.new_cache(1, 8).k.dtype == torch.float32
    assert ((half - full).norm() / full.norm()).item() < 2e-3  # measured 3.5e-4
    assert torch.equal(half.argmax(-1), full.argmax(-1))
    # The CLI flag sets it for every command that loads a model.
    from mistral7b.cli import _load_model, build_parser
    args = build_parser().parse_args(["generate", "--model", str(tiny_folder), "--quantize", "int8",
                                      "--kv-cache-dtype", "bf16", "--prompt-ids", "1"])
    assert _load_model(args).new_cache(1, 8).k.dtype == torch.bfloat16


@torch.no_grad()
def test_fused_quantized_projection_is_a_view(tiny_model):
    model = quantize(copy_of(tiny_model), "int4")
    attention = model.layers[0].attention
    fused = execution_of(model).layers[0].qkv.linear
    assert attention.wq.qweight.untyped_storage().data_ptr() == fused.qweight.untyped_storage().data_ptr()
    x = torch.randn(1, 64)
    assert torch.allclose(torch.cat([attention.wq(x), attention.wk(x), attention.wv(x)], -1), fused(x), atol=1e-5)


def test_load_quantized_and_bad_arguments(tmp_path, tiny_model):
    mistral7b.save(tiny_model, tmp_path / "m")
    model = mistral7b.load(tmp_path / "m", quantize="int8")
    assert quantized_mode(model) == "int8" and model.layers[0].attention.wq.group_size == 64
    assert model.output.group_size == 32  # per channel, but the vocabulary projection in groups of 32
    assert mistral7b.load(tmp_path / "m", quantize="int8", group_size=64).output.group_size == 64  # as asked
    with pytest.raises(InputError, match="int8, int4"):
        mistral7b.load(tmp_path / "m", quantize="int3")
    with pytest.raises(InputError, match="multiple of 32"):
        mistral7b.load(tmp_path / "m", quantize="int4", group_size=48)
    with pytest.raises(InputError, match="does not divide"):
        quantize(copy_of(tiny_model), "int4", group_size=256)


# ---- GGUF blocks kept packed ---------------------------------------------------------------------

@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K], ids=lambda q: q.name)
def test_gguf_blocks_pack_exactly(qtype):
    """ggml-quantized rows, repacked without a trip through fp32, dequantize to ggml's own values."""
    lib = ggml()
    w = (torch.randn(24, 512, generator=torch.Generator().manual_seed(1)) * 0.1).numpy()
    data = ggml_quantize(lib, w, qtype)
    mode, tensors = pack(data, qtype)
    ours = (kernels.dequantize_int8 if mode == "int8" else kernels.dequantize_int4)(*tensors)
    assert torch.equal(ours, torch.from_numpy(ggml_dequantize(lib, data, qtype, w.shape)))


@torch.no_grad()
def test_gguf_quantized_weights_load_packed(tmp_path, tiny_model):
    """A Q4_1 GGUF with --quantize keeps its blocks: the layers compute exactly ggml's weights."""
    lib = ggml()
    args = mistral7b.ModelArgs(dim=64, n_layers=2, head_dim=16, hidden_dim=128, n_heads=4, n_kv_heads=2,
                               norm_eps=1e-5, vocab_size=128, sliding_window=4, tied_embeddings=True)
    state, expected = {}, {}
    for name, tensor in tiny_model.state_dict().items():
        if name == "output.weight":
            continue
        data = tensor.float().numpy()
        if data.ndim == 2:
            qtype = Q.Q8_0 if name == "tok_embeddings.weight" else Q.Q4_1
            state[name] = (ggml_quantize(lib, data, qtype), qtype)
            expected[name] = ggml_dequantize(lib, state[name][0], qtype, data.shape)
        else:
            state[name] = data
    path = write_gguf(tmp_path / "q41.gguf", state, args)
    model = mistral7b.load(path, quantize="int4")
    wq = model.layers[0].attention.wq
    assert isinstance(wq, Int4Linear) and wq.group_size == 32
    assert torch.equal(wq.dequantize(), torch.from_numpy(expected["layers.0.attention.wq.weight"]))
    assert isinstance(model.output, Int8Linear)  # Q8_0 stays int8, tied: also the float embedding table
    assert torch.equal(model.output.dequantize(), torch.from_numpy(expected["tok_embeddings.weight"]))
    assert torch.equal(model.tok_embeddings.weight, torch.from_numpy(expected["tok_embeddings.weight"]))
    float_model = mistral7b.load(path)
    # A pre-fill longer than the GEMV's row limit: dequantized exact weights, float matmul.
    n = 2 * kernels.GEMV_MAX_ROWS
    ids = torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(2))
    ref = float_model(ids, [n])
    assert ((model(ids, [n]) - ref).norm() / ref.norm()).item() < 1e-5


@pytest.fixture(scope="module")
def smollm2_text_and_base_perplexity():
    ids = torch.tensor(mistral7b.load_tokenizer(None).encode(TEXT))
    return ids, decode_perplexity(mistral7b.load(None), ids)


@pytest.mark.parametrize("name,make,limit", [
    ("int8 G32", lambda: quantize(mistral7b.load(None), "int8", 32), 0.02),
    ("int8 per channel", lambda: quantize(mistral7b.load(None), "int8"), 0.02),
    ("int4 GGUF blocks", lambda: mistral7b.load(None, quantize="int4"), 0.10),
    ("int4 G32 re-quantized", lambda: quantize(mistral7b.load(None), "int4", 32), 0.10),
], ids=["int8-G32", "int8-per-channel", "int4-GGUF-blocks", "int4-G32-requantized"])
def test_smollm2_perplexity_stays_within_bounds(smollm2_text_and_base_perplexity, name, make, limit):
    """The issue's faithfulness bar on a fixed English text, scored token by token through the
    decode path (the native decode step; GEMVs with int16 activations for int8 weights, int8 for
    int4): int8 within 2%, int4 within 10% of fp32. BENCHMARKS.md has the table."""
    ids, base = smollm2_text_and_base_perplexity
    quantized = decode_perplexity(make(), ids)
    assert abs(quantized / base - 1) < limit, (name, base, quantized)


def test_cli_quantize_flag():
    out = run_cli("generate", "--quantize", "int4", "--max-tokens", "5", "--prompt-ids", "1,2,3", "--output-ids")
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.split(",")) >= 5
    bad = run_cli("generate", "--quantize", "int4", "--group-size", "40", "--prompt-ids", "1,2")
    assert bad.returncode == 2 and "multiple of 32" in bad.stderr and "Traceback" not in bad.stderr
