"""GGUF files (llama.cpp's format): one file holding metadata and, often quantized, tensors.

llama.cpp stores Mistral 7B, Llama and SmolLM2 alike under architecture "llama". Its converter
undoes Hugging Face's q/k row permutation, so `attn_q`/`attn_k` hold the reference's
interleaved-pair layout, which is ours: no permutation here (tests/test_gguf.py proves it against
llama.cpp's own logits).

Each tensor is dequantized from the memory-mapped file when the model asks for it (fp32, numpy;
the times are in BENCHMARKS.md, "Loading the default model").
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..args import ModelArgs
from ..errors import CheckpointError, ConfigError
from .common import NamedTensors, PartOf

if TYPE_CHECKING:
    from ..gguf_file import GGUFFile
    from ..quant import PackedWeight

_ARCHITECTURES = {"llama"}  # llama.cpp has no "mistral" architecture: Mistral 7B GGUFs say "llama"
# The types (ggml type names) tests/test_gguf.py checks bit for bit against ggml's own dequantizer.
_SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
_TOP_NAMES = {"token_embd": "tok_embeddings", "output_norm": "norm", "output": "output"}
_LAYER_NAMES = {
    "attn_norm": "attention_norm", "ffn_norm": "ffn_norm",
    "attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv", "attn_output": "attention.wo",
    "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2", "ffn_up": "feed_forward.w3",
}
_MISSING = object()
_EMBEDDING = "tok_embeddings.weight"
_LINEAR_SUFFIXES = tuple(f"{n}.weight" for n in ("wq", "wk", "wv", "wo", "w1", "w2", "w3")) + ("output.weight",)


def is_gguf(path: Path) -> bool:
    if not path.is_file():
        return False
    if path.suffix.lower() == ".gguf":
        return True
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def weight_files(path: Path) -> list[Path]:
    return [path]


def open_file(path: Path) -> GGUFFile:
    """The parsed file. gguf_file is imported here, not at the top: it loads the gguf package
    (~0.1 s), which `import mistral7b` should not pay."""
    from ..gguf_file import open_gguf

    return open_gguf(path)


def _float32_value(value: float) -> float:
    # GGUF stores floats as float32: 1e-5 comes back as 9.99999974e-06. Take the shortest decimal
    # that rounds to the same float32, which is the value the model's author wrote.
    return float(str(np.float32(value)))


def read_args(path: Path) -> ModelArgs:
    file = open_file(path)

    def get(key: str, default=_MISSING):
        if (value := file.metadata.get(key, default)) is _MISSING:
            raise ConfigError(f"{path}: missing GGUF metadata key '{key}'")
        return value

    arch = get("general.architecture")
    if arch not in _ARCHITECTURES:
        raise CheckpointError(f"{path}: architecture {arch!r} is not supported (expected one of {sorted(_ARCHITECTURES)})")
    if get(f"{arch}.expert_count", 0):
        raise ConfigError(f"{path}: key '{arch}.expert_count' describes a mixture-of-experts model, which is not supported")
    scaling = get(f"{arch}.rope.scaling.type", "none")
    if scaling != "none":
        raise ConfigError(f"{path}: key '{arch}.rope.scaling.type' is {scaling!r}; only 'none' is supported")
    if "token_embd.weight" not in file.tensors:
        raise CheckpointError(f"{path}: missing tensor 'token_embd.weight'")
    params = dict(
        dim=get(f"{arch}.embedding_length"), n_layers=get(f"{arch}.block_count"),
        hidden_dim=get(f"{arch}.feed_forward_length"), n_heads=get(f"{arch}.attention.head_count"),
        n_kv_heads=get(f"{arch}.attention.head_count_kv", get(f"{arch}.attention.head_count")),
        norm_eps=_float32_value(get(f"{arch}.attention.layer_norm_rms_epsilon")),
        vocab_size=file.tensors["token_embd.weight"].shape[0],  # [vocab, dim]
        rope_theta=_float32_value(get(f"{arch}.rope.freq_base", 10000.0)),
        sliding_window=get(f"{arch}.attention.sliding_window", None),
        max_seq_len=get(f"{arch}.context_length", None),
        tied_embeddings="output.weight" not in file.tensors,
    )
    if (head_dim := get(f"{arch}.attention.key_length", None)) is not None:
        params["head_dim"] = head_dim  # else dim / n_heads
    args = ModelArgs.from_dict(params, source=str(path))
    for key in (f"{arch}.attention.value_length", f"{arch}.rope.dimension_count"):
        if get(key, args.head_dim) != args.head_dim:
            raise ConfigError(f"{path}: key '{key}' is {get(key)}, but only {args.head_dim} (the head size) is supported")
    return args


def _our_name(name: str) -> str | None:
    base, _, suffix = name.rpartition(".")
    if suffix != "weight":
        return None
    if base in _TOP_NAMES:
        return f"{_TOP_NAMES[base]}.weight"
    parts = base.split(".")  # blk.{i}.{part}
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.weight"
    return None


def _packed(file: GGUFFile, tensor, part) -> PackedWeight | None:
    """The tensor's Q8_0/Q4_x blocks as an int8/int4 layer's tensors, or None (another type)."""
    from ..quant import PackedWeight
    from .gguf_quant import PACKED_MODES, pack

    blocks = file.blocks(tensor, part) if tensor.type in PACKED_MODES else None
    return None if blocks is None else PackedWeight(*pack(blocks[0].reshape(-1, blocks[0].shape[-1]), tensor.type))


def read_tensors(path: Path, args: ModelArgs, part_of: PartOf | None = None, *, packed: bool = False) -> NamedTensors:
    """(our name, fp32 tensor) for each tensor of the file, dequantized one at a time from the map
    (with `part_of`: only that part, see GGUFFile.dequantize).

    packed: the linear layers' Q8_0/Q4_x weights come as `PackedWeight`s instead (their blocks as
    they are: no fp32 copy); a tied embedding also yields its packed copy as "output.weight"."""
    file = open_file(path)
    for tensor in file.tensors.values():
        name = _our_name(tensor.name)
        if name is None:
            raise CheckpointError(f"{path}: unexpected tensor '{tensor.name}' (not part of a llama/Mistral model)")
        kind = tensor.type.name
        if kind not in _SUPPORTED_TYPES:
            raise CheckpointError(f"{path}: tensor '{tensor.name}' has type {kind}, which mistral7b cannot read "
                                  f"(supported: {', '.join(_SUPPORTED_TYPES)})")
        target = "output.weight" if args.tied_embeddings and name == _EMBEDDING else name
        weight = None
        if packed and target.endswith(_LINEAR_SUFFIXES):
            if (weight := _packed(file, tensor, part_of and part_of(target, tensor.shape))) is not None:
                yield target, weight
                if target == name:  # a tied embedding is the float lookup table as well
                    continue
        part = part_of and part_of(name, tensor.shape)
        if (weight is None or part is not None) and len(tensor.shape) == 2:  # else: the tied twin's blocks
            weight = _packed(file, tensor, part)
        if weight is not None:  # a Q8_0/Q4_x matrix: the values ggml computes, from our layer's blocks,
            yield name, _dequantized(weight)  # 5-10x faster than the gguf package's dequantizer
            continue
        try:
            values = file.dequantize(tensor, part)
        except (ValueError, NotImplementedError) as e:
            raise CheckpointError(f"{path}: tensor '{tensor.name}' ({kind}) cannot be dequantized ({e})") from None
        # F32 data is a read-only view of the memory-mapped file: copy it; dequantized data is fresh.
        yield name, torch.from_numpy(np.require(values, np.float32, ["C", "W"]))


def _dequantized(weight: PackedWeight) -> torch.Tensor:
    from ..kernels.formats import dequantize_int4, dequantize_int8  # torch's ops: no native build at load

    return (dequantize_int8 if weight.mode == "int8" else dequantize_int4)(*weight.tensors)


# Weight-only mode that keeps a GGUF's quantized blocks at their precision or above (the 4-bit and
# lower types run as int4, 5- to 8-bit ones as int8).
_NATIVE_MODES = {"Q2_K": "int4", "Q3_K": "int4", "Q4_0": "int4", "Q4_1": "int4", "Q4_K": "int4",
                 "Q5_0": "int8", "Q5_1": "int8", "Q5_K": "int8", "Q6_K": "int8", "Q8_0": "int8"}


def native_quantize(path: Path) -> str | None:
    """"int4" or "int8" for a file whose blocks' linear layers are mostly quantized (by weight count),
    None when they are mostly float: the mode in which the file runs as it is, as llama.cpp runs it."""
    count: dict[str | None, int] = {}
    for tensor in open_file(path).tensors.values():
        name = _our_name(tensor.name) or ""
        if name.startswith("layers.") and name.endswith(_LINEAR_SUFFIXES):
            mode = _NATIVE_MODES.get(tensor.type.name)
            count[mode] = count.get(mode, 0) + int(np.prod(tensor.shape))
    return max(count, key=count.get) if count else None


def default_quantize(path: Path | None, dtype: str | None, quantize: str | None) -> str | None:
    """The command line's weight mode: `quantize` when asked; else, with no dtype asked, a quantized
    GGUF's own mode (its blocks run as they are); an asked dtype dequantizes."""
    from ..defaults import default_model_path

    if quantize or dtype not in (None, "auto"):
        return quantize
    path = default_model_path() if path is None else Path(path)
    return native_quantize(path) if is_gguf(path) else None
