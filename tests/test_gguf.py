"""GGUF loading: tiny models written with gguf.GGUFWriter, every quant type bit for bit against
ggml's own dequantizer, and the real SmolLM2 GGUF against llama.cpp's logits."""

from __future__ import annotations

import copy
import ctypes
import os

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

import mistral7b
from mistral7b.defaults import default_model_path
from mistral7b.errors import CheckpointError, ConfigError
from mistral7b.weights.describe import describe
from mistral7b.weights.hf import permute_to_hf

# The brief's name map, written out again here so the loader's own table is checked, not reused.
_GGUF_TOP = {"tok_embeddings": "token_embd", "norm": "output_norm", "output": "output"}
_GGUF_LAYER = {"attention_norm": "attn_norm", "ffn_norm": "ffn_norm", "attention.wq": "attn_q",
               "attention.wk": "attn_k", "attention.wv": "attn_v", "attention.wo": "attn_output",
               "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down", "feed_forward.w3": "ffn_up"}
QUANT_TYPES = [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]


def gguf_name(name: str) -> str:
    base = name.removesuffix(".weight")
    if base in _GGUF_TOP:
        return f"{_GGUF_TOP[base]}.weight"
    _, index, rest = base.split(".", 2)
    return f"blk.{index}.{_GGUF_LAYER[rest]}.weight"


def write_gguf(path, state: dict[str, np.ndarray | tuple[np.ndarray, Q]], args: mistral7b.ModelArgs, *,
               arch: str = "llama", extra: dict[str, str] | None = None):
    """A GGUF file as llama.cpp's converter writes one. state: our name -> fp32 array, or
    (quantized bytes [rows, bytes per row], type)."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(args.n_layers)
    if args.max_seq_len:
        w.add_context_length(args.max_seq_len)
    w.add_embedding_length(args.dim)
    w.add_feed_forward_length(args.hidden_dim)
    w.add_head_count(args.n_heads)
    w.add_head_count_kv(args.n_kv_heads)
    w.add_key_length(args.head_dim)
    w.add_layer_norm_rms_eps(args.norm_eps)
    w.add_rope_freq_base(args.rope_theta)
    if args.sliding_window:
        w.add_sliding_window(args.sliding_window)
    for key, value in (extra or {}).items():
        w.add_string(key, value)
    for name, value in state.items():
        if isinstance(value, tuple):
            w.add_tensor(gguf_name(name), value[0], raw_dtype=value[1])
        else:
            w.add_tensor(gguf_name(name), value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def model_state(model, qtype: Q = Q.F32) -> dict:
    """Our model's tensors for write_gguf: 2-D weights as `qtype` (gguf's quantizer), norms fp32."""
    out = {}
    for name, tensor in model.state_dict().items():
        if model.args.tied_embeddings and name == "output.weight":
            continue
        data = tensor.float().numpy()
        if data.ndim == 2:
            data = gguf.quants.quantize(data, qtype)  # float arrays for F32/F16, else bytes
        out[name] = (data, qtype) if data.dtype == np.uint8 else data
    return out


def random_ids(n: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


# ---- tiny random models -------------------------------------------------------------------------

@torch.no_grad()
def test_f32_round_trip_is_exact(tiny_model, tmp_path):
    path = write_gguf(tmp_path / "tiny.gguf", model_state(tiny_model), tiny_model.args)
    loaded = mistral7b.load(path)
    assert loaded.args == tiny_model.args  # sliding window 4, eps 1e-5 (not float32's 9.99999974e-06)
    assert loaded.args.sliding_window == 4 and not loaded.args.tied_embeddings
    for name, tensor in tiny_model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    ids = random_ids(5 * 4 + 1, tiny_model.args.vocab_size)
    assert torch.equal(loaded(ids, [len(ids)]), tiny_model(ids, [len(ids)]))
    again = mistral7b.load(path, dtype="bf16")
    assert again.dtype == torch.bfloat16
    assert torch.equal(again.tok_embeddings.weight, tiny_model.tok_embeddings.weight.bfloat16())


@torch.no_grad()
def test_changed_file_is_read_again(tiny_model, tmp_path):
    path = tmp_path / "model.gguf"
    write_gguf(path, model_state(tiny_model), tiny_model.args)
    first = mistral7b.load(path)
    state = model_state(tiny_model)
    state["norm.weight"] = state["norm.weight"] * 2
    write_gguf(path, state, tiny_model.args)
    os.utime(path, ns=(1, 1))  # a different mtime even on coarse-clock file systems
    second = mistral7b.load(path)
    assert torch.equal(second.norm.weight, first.norm.weight * 2)


# Max |logit diff| vs the fp32 model (logits std 0.8), measured over seeds 0-2 of this tiny model:
# F16 0.0032, BF16 0.028, Q8_0 0.067; bounds leave ~3x headroom. (The 4- and 5-bit types move this
# random model's logits by ~1, too much for a useful bound: test_dequantization_matches_ggml checks them.)
TINY_TOLERANCE = {Q.F16: 0.01, Q.BF16: 0.08, Q.Q8_0: 0.2}


@pytest.mark.parametrize("qtype", list(TINY_TOLERANCE), ids=lambda q: q.name)
@torch.no_grad()
def test_quantized_tiny_model_logits(tiny_model, tmp_path, qtype):
    path = write_gguf(tmp_path / f"tiny-{qtype.name}.gguf", model_state(tiny_model, qtype), tiny_model.args)
    loaded = mistral7b.load(path)
    assert loaded.dtype == torch.float32
    ids = random_ids(5 * 4 + 1, tiny_model.args.vocab_size, seed=1)
    diff = (loaded(ids, [len(ids)]) - tiny_model(ids, [len(ids)])).abs().max().item()
    assert diff <= TINY_TOLERANCE[qtype], diff


def test_describe_lists_tensor_types(tiny_model, tmp_path):
    path = write_gguf(tmp_path / "tiny-q8.gguf", model_state(tiny_model, Q.Q8_0), tiny_model.args)
    info = describe(path)
    n_layers = tiny_model.args.n_layers
    assert (info["format"], info["layers"], info["vocab_size"]) == ("gguf", n_layers, tiny_model.args.vocab_size)
    # matrices: embeddings, output and 7 per layer; norms: the final one and 2 per layer
    assert info["tensor_types"] == {"Q8_0": 2 + 7 * n_layers, "F32": 1 + 2 * n_layers}


# ---- every quant type against ggml's own quantizer and dequantizer ------------------------------

def ggml():
    """ggml's C library as llama-cpp-python ships it (the code llama.cpp runs)."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python (ggml's quantizer, the peer) is not installed")
    from llama_cpp._ggml import libggml

    libggml.ggml_quantize_chunk.restype = ctypes.c_size_t
    libggml.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                            ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    libggml.ggml_row_size.restype = ctypes.c_size_t
    libggml.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    return libggml


def ggml_quantize(lib, x: np.ndarray, qtype: Q) -> np.ndarray:
    rows, cols = x.shape
    out = np.zeros((rows, lib.ggml_row_size(int(qtype), cols)), np.uint8)
    x = np.ascontiguousarray(x, np.float32)
    assert lib.ggml_quantize_chunk(int(qtype), x.ctypes.data, out.ctypes.data, 0, rows, cols, None) == out.size
    return out


def ggml_dequantize(lib, data: np.ndarray, qtype: Q, shape: tuple[int, int]) -> np.ndarray:
    name = {Q.F16: "ggml_fp16_to_fp32_row", Q.BF16: "ggml_bf16_to_fp32_row"}.get(
        qtype, "dequantize_row_" + qtype.name.lower().replace("_k", "_K"))
    fn = getattr(lib, name)
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64], None
    out = np.zeros(shape, np.float32)
    fn(np.ascontiguousarray(data).ctypes.data, out.ctypes.data, out.size)
    return out


# Relative RMS error of ggml's quantize -> dequantize on N(0, 0.1) weights, measured: Q8_0 0.005,
# F16 2e-4, BF16 0.002, Q6_K 0.018, Q5_* 0.04, Q4_* 0.08, Q3_K 0.15, Q2_K 0.29.
ROUND_TRIP_ERROR = {Q.F16: 1e-3, Q.BF16: 5e-3, Q.Q8_0: 0.01, Q.Q6_K: 0.03, Q.Q5_0: 0.06, Q.Q5_1: 0.06,
                    Q.Q5_K: 0.06, Q.Q4_0: 0.12, Q.Q4_1: 0.12, Q.Q4_K: 0.12, Q.Q3_K: 0.25, Q.Q2_K: 0.4}


@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda q: q.name)
@torch.no_grad()
def test_dequantization_matches_ggml(tmp_path, qtype):
    """A model whose every matrix ggml quantized: our loaded weights equal ggml's dequantization."""
    lib = ggml()
    torch.manual_seed(0)
    # Rows of 256 and 512 values: whole K-quant super-blocks.
    args = mistral7b.ModelArgs(dim=256, n_layers=1, head_dim=64, hidden_dim=512, n_heads=4, n_kv_heads=2,
                               norm_eps=1e-5, vocab_size=64, tied_embeddings=True)
    state, expected = {}, {}
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in mistral7b.Transformer(args).state_dict().items()}
    for name, shape in shapes.items():
        if name == "output.weight":
            continue
        original = (torch.randn(shape) * 0.1).numpy()
        if len(shape) == 1:
            state[name] = expected[name] = original
            continue
        data = ggml_quantize(lib, original, qtype)
        state[name] = (data, qtype)
        expected[name] = ggml_dequantize(lib, data, qtype, shape)
        error = np.sqrt(((expected[name] - original) ** 2).mean() / (original ** 2).mean())
        assert error <= ROUND_TRIP_ERROR[qtype], (name, error)
    path = write_gguf(tmp_path / f"k-{qtype.name}.gguf", state, args)
    loaded = mistral7b.load(path).state_dict()
    for name, values in expected.items():
        assert torch.equal(loaded[name], torch.from_numpy(values)), name


# ---- bad input ----------------------------------------------------------------------------------

def test_unsupported_architecture(tiny_model, tmp_path):
    path = write_gguf(tmp_path / "gpt2.gguf", model_state(tiny_model), tiny_model.args, arch="gpt2")
    with pytest.raises(CheckpointError, match=r"gpt2\.gguf: architecture 'gpt2' is not supported"):
        mistral7b.load(path)


def test_unsupported_quant_type(tiny_model, tmp_path):
    state = model_state(tiny_model)
    rows, cols = state["layers.0.attention.wq.weight"].shape
    block, size = gguf.GGML_QUANT_SIZES[Q.IQ4_NL]
    state["layers.0.attention.wq.weight"] = (np.zeros((rows, cols // block * size), np.uint8), Q.IQ4_NL)
    path = write_gguf(tmp_path / "iq4.gguf", state, tiny_model.args)
    with pytest.raises(CheckpointError, match=r"iq4\.gguf: tensor 'blk\.0\.attn_q\.weight' has type IQ4_NL"):
        mistral7b.load(path)


def test_rope_scaling_is_rejected(tiny_model, tmp_path):
    path = write_gguf(tmp_path / "yarn.gguf", model_state(tiny_model), tiny_model.args,
                      extra={"llama.rope.scaling.type": "yarn"})
    with pytest.raises(ConfigError, match=r"yarn\.gguf: key 'llama\.rope\.scaling\.type' is 'yarn'"):
        mistral7b.load(path)


@pytest.mark.parametrize("damage", ["truncated", "bad magic", "empty"])
def test_damaged_file(tiny_model, tmp_path, damage):
    path = write_gguf(tmp_path / "broken.gguf", model_state(tiny_model), tiny_model.args)
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) * 2 // 3], "bad magic": b"GGML" + data[4:], "empty": b""}[damage])
    with pytest.raises(CheckpointError, match=r"broken\.gguf: not a readable GGUF file"):
        mistral7b.load(path)


def test_unknown_file_mentions_gguf(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(CheckpointError, match=r"\.gguf file"):
        mistral7b.load(path)


# ---- the real SmolLM2-135M-Instruct (Q4_1) against llama.cpp ------------------------------------

PROMPTS = [
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nWhat is the capital of France, and why is it famous?<|im_end|>\n<|im_start|>assistant\n"
    "The capital of France is Paris. It is famous for the Eiffel Tower, the Louvre museum and its cafes.",
    "<|im_start|>user\nWrite a haiku about autumn leaves.<|im_end|>\n<|im_start|>assistant\n"
    "Crimson leaves drift down,\nwhispering to the cold earth,\nautumn says goodbye.",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    if n < 2:\n        return n\n"
    "    return fibonacci(n - 1) + fibonacci(n - 2)\n\n\nfor i in range(10):\n    print(fibonacci(i))\n",
    "Photosynthesis is the process by which green plants use sunlight, water and carbon dioxide to make "
    "glucose and oxygen. It takes place mainly in the leaves, inside small structures called chloroplasts.",
]


@pytest.fixture(scope="module")
def smollm2():
    """Our SmolLM2 from `load(None)`: dequantized from the GGUF file (~2 s)."""
    return mistral7b.load(None)


def llama_cpp_logits(model_path, prompts, **options) -> list[tuple[list[int], torch.Tensor]]:
    """(token ids from llama.cpp's own tokenizer, llama.cpp's logits [T, vocab]) per prompt."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (the peer) is not installed")
    llm = llama_cpp.Llama(model_path=str(model_path), logits_all=True, n_ctx=512, n_threads=1, verbose=False, **options)
    out = []
    for text in prompts:
        ids = llm.tokenize(text.encode(), add_bos=False, special=True)  # SmolLM2 adds no BOS
        llm.reset()
        llm.eval(ids)
        out.append((ids, torch.tensor(np.array(llm.scores[: len(ids)]), dtype=torch.float32)))
    llm.close()
    return out


def test_default_model_is_smollm2(smollm2):
    args = smollm2.args
    assert (args.n_layers, args.n_heads, args.n_kv_heads, args.dim, args.head_dim) == (30, 9, 3, 576, 64)
    assert (args.vocab_size, args.rope_theta, args.sliding_window) == (49152, 100000.0, None)
    assert args.tied_embeddings and smollm2.output.weight is smollm2.tok_embeddings.weight
    again = mistral7b.load(None)  # the file parsed once, its tensors dequantized again
    assert torch.equal(again.layers[3].attention.wq.weight, smollm2.layers[3].attention.wq.weight)


@torch.no_grad()
def test_smollm2_matches_llama_cpp(smollm2):
    """The shipped Q4_1 file as is. llama.cpp quantizes activations to 8 bits for its Q4_1 dot
    products and keeps an F16 KV cache, so logits differ slightly. Measured on these prompts:
    top-1 equal at 205 of 209 positions (98.1%), max |logit diff| 2.6 (logits std ~7)."""
    agree = total = 0
    for ids, expected in llama_cpp_logits(default_model_path(), PROMPTS):
        ours = smollm2(torch.tensor(ids), [len(ids)])
        assert (ours - expected).abs().max().item() < 4.0
        agree += (ours.argmax(-1) == expected.argmax(-1)).sum().item()
        total += len(ids)
    assert agree / total >= 0.95, f"top-1 agreement {agree}/{total}"


@torch.no_grad()
def test_smollm2_equals_llama_cpp_in_fp32(smollm2, tmp_path):
    """The same weights in an F32 GGUF (dequantized here with the gguf package, not by our loader)
    and llama.cpp with an F32 KV cache: nothing is quantized on either side, so the logits agree
    to float rounding (measured max |diff| 9e-5). This proves the q/k layout, RoPE, norms and tied
    output; with wq/wk permuted as Hugging Face stores them the diffs are ~20."""
    source = gguf.GGUFReader(default_model_path())
    writer = gguf.GGUFWriter(str(tmp_path / "smollm2-f32.gguf"), "llama")
    for field in source.fields.values():
        if field.name.startswith("GGUF.") or field.name in ("general.architecture", "general.file_type"):
            continue
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub_type)
    for tensor in source.tensors:
        shape = tuple(int(n) for n in reversed(tensor.shape))
        writer.add_tensor(tensor.name, gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(shape))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    f32 = 0  # GGML_TYPE_F32 for llama.cpp's KV cache
    # One prompt (39 tokens): llama.cpp's F32 matmuls take ~5 s for it on one core.
    results = llama_cpp_logits(tmp_path / "smollm2-f32.gguf", PROMPTS[1:2], type_k=f32, type_v=f32)
    for ids, expected in results:
        ours = smollm2(torch.tensor(ids), [len(ids)])
        assert (ours - expected).abs().max().item() < 1e-3
    # The comparison is sensitive to the layout: rows permuted the Hugging Face way fail it.
    permuted = copy.deepcopy(smollm2)
    for layer in permuted.layers:
        layer.attention.wq.weight.copy_(permute_to_hf(layer.attention.wq.weight, permuted.args.n_heads))
        layer.attention.wk.weight.copy_(permute_to_hf(layer.attention.wk.weight, permuted.args.n_kv_heads))
    ids, expected = results[0]
    assert (permuted(torch.tensor(ids), [len(ids)]) - expected).abs().max().item() > 5
