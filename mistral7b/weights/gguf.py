"""GGUF files (llama.cpp's format): one file holding metadata and, often quantized, tensors.

llama.cpp stores Mistral 7B, Llama and SmolLM2 alike under architecture "llama". Its converter
undoes Hugging Face's q/k row permutation, so `attn_q`/`attn_k` hold the reference's
interleaved-pair layout, which is ours: no permutation here (tests/test_gguf.py proves it against
llama.cpp's own logits). GGUF lists a tensor's shape innermost first (`ne` = [cols, rows]).

Opening a file with `gguf.GGUFReader` parses the whole vocabulary (~5 s for SmolLM2's 49k tokens)
and numpy dequantization costs ~2 s more per 135M parameters, so `cached_copy` converts a small
model once into a reference folder (fp32 safetensors) that later loads read in well under a second.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader
from gguf.quants import dequantize

from ..args import ModelArgs
from ..errors import CheckpointError, ConfigError
from . import reference
from .common import NamedTensors, build_model

_ARCHITECTURES = {"llama"}  # llama.cpp has no "mistral" architecture: Mistral 7B GGUFs say "llama"
# The types tests/test_gguf.py checks bit for bit against ggml's own dequantizer.
_SUPPORTED_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1,
                    Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)
_TOP_NAMES = {"token_embd": "tok_embeddings", "output_norm": "norm", "output": "output"}
_LAYER_NAMES = {
    "attn_norm": "attention_norm", "ffn_norm": "ffn_norm",
    "attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv", "attn_output": "attention.wo",
    "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2", "ffn_up": "feed_forward.w3",
}
# Models up to ~1B parameters are cached (fp32 copy <= 4 GiB); for bigger ones the fixed parsing
# cost matters less and a copy would fill the disk, so they are dequantized on every load.
_CACHE_MAX_BYTES = 4 * 2**30
_CACHE_VERSION = 1  # bump when the conversion changes, so stale copies are not used
_MISSING = object()


def is_gguf(path: Path) -> bool:
    if not path.is_file():
        return False
    if path.suffix.lower() == ".gguf":
        return True
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def weight_files(path: Path) -> list[Path]:
    return [path]


@functools.lru_cache(maxsize=1)
def _open(path: Path, stamp: tuple[int, int]) -> GGUFReader:
    try:
        reader = GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError, OverflowError) as e:
        raise CheckpointError(f"{path}: not a readable GGUF file ({e}); it may be truncated or corrupt") from None
    if reader.byte_order != "I":
        raise CheckpointError(f"{path}: is a big-endian GGUF file, which is not supported")
    return reader


def open_reader(path: Path) -> GGUFReader:
    """The parsed file, kept for the next call on the same unchanged file (parsing takes seconds)."""
    stat = path.stat()
    return _open(path.absolute(), (stat.st_size, stat.st_mtime_ns))


def _float32_value(value: float) -> float:
    # GGUF stores floats as float32: 1e-5 comes back as 9.99999974e-06. Take the shortest decimal
    # that rounds to the same float32, which is the value the model's author wrote.
    return float(str(np.float32(value)))


def args_from_reader(reader: GGUFReader, path: Path) -> ModelArgs:
    def get(key: str, default=_MISSING):
        field = reader.get_field(key)
        if field is None:
            if default is _MISSING:
                raise ConfigError(f"{path}: missing GGUF metadata key '{key}'")
            return default
        return field.contents()

    arch = get("general.architecture")
    if arch not in _ARCHITECTURES:
        raise CheckpointError(f"{path}: architecture {arch!r} is not supported (expected one of {sorted(_ARCHITECTURES)})")
    if get(f"{arch}.expert_count", 0):
        raise ConfigError(f"{path}: key '{arch}.expert_count' describes a mixture-of-experts model, which is not supported")
    scaling = get(f"{arch}.rope.scaling.type", "none")
    if scaling != "none":
        raise ConfigError(f"{path}: key '{arch}.rope.scaling.type' is {scaling!r}; only 'none' is supported")
    names = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in names:
        raise CheckpointError(f"{path}: missing tensor 'token_embd.weight'")
    params = dict(
        dim=get(f"{arch}.embedding_length"), n_layers=get(f"{arch}.block_count"),
        hidden_dim=get(f"{arch}.feed_forward_length"), n_heads=get(f"{arch}.attention.head_count"),
        n_kv_heads=get(f"{arch}.attention.head_count_kv", get(f"{arch}.attention.head_count")),
        norm_eps=_float32_value(get(f"{arch}.attention.layer_norm_rms_epsilon")),
        vocab_size=int(names["token_embd.weight"].shape[1]),  # ne = [dim, vocab]
        rope_theta=_float32_value(get(f"{arch}.rope.freq_base", 10000.0)),
        sliding_window=get(f"{arch}.attention.sliding_window", None),
        max_seq_len=get(f"{arch}.context_length", None),
        tied_embeddings="output.weight" not in names,
    )
    if (head_dim := get(f"{arch}.attention.key_length", None)) is not None:
        params["head_dim"] = head_dim  # else dim / n_heads
    args = ModelArgs.from_dict(params, source=str(path))
    for key in (f"{arch}.attention.value_length", f"{arch}.rope.dimension_count"):
        if get(key, args.head_dim) != args.head_dim:
            raise ConfigError(f"{path}: key '{key}' is {get(key)}, but only {args.head_dim} (the head size) is supported")
    return args


def read_args(path: Path) -> ModelArgs:
    return args_from_reader(open_reader(path), path)


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


def read_tensors(path: Path, args: ModelArgs) -> NamedTensors:
    """(our name, fp32 tensor) for each tensor of the file, dequantized one at a time."""
    for tensor in open_reader(path).tensors:
        name = _our_name(tensor.name)
        if name is None:
            raise CheckpointError(f"{path}: unexpected tensor '{tensor.name}' (not part of a llama/Mistral model)")
        kind = tensor.tensor_type
        if kind not in _SUPPORTED_TYPES:
            raise CheckpointError(f"{path}: tensor '{tensor.name}' has type {kind.name}, which mistral7b cannot read "
                                  f"(supported: {', '.join(t.name for t in _SUPPORTED_TYPES)})")
        shape = tuple(int(n) for n in reversed(tensor.shape))  # ne [cols, rows] -> [rows, cols]
        try:
            values = dequantize(tensor.data, kind).reshape(shape)
        except (ValueError, NotImplementedError) as e:
            raise CheckpointError(f"{path}: tensor '{tensor.name}' ({kind.name}) cannot be dequantized ({e})") from None
        # F32 data is a read-only view of the memory-mapped file: copy it; quantized data is fresh.
        yield name, torch.from_numpy(np.require(values, np.float32, ["C", "W"]))


def cache_root() -> Path:
    return Path(os.environ.get("MISTRAL7B_CACHE") or Path.home() / ".cache" / "mistral7b")


def cached_copy(path: Path) -> Path | None:
    """A reference folder with `path`'s dequantized weights, converted on first use.

    Keyed by the file's path, size and mtime, so an edited or replaced file is converted again.
    None when the model is too big to cache or the cache cannot be written: read the GGUF then.
    """
    stat = path.stat()
    key = f"{_CACHE_VERSION}|{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    folder = cache_root() / "gguf" / f"{path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    if folder.is_dir():  # complete: it appears only by the atomic rename below
        return folder
    args = read_args(path)
    if args.n_params * 4 > _CACHE_MAX_BYTES:
        return None
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
    except OSError as e:
        warnings.warn(f"cannot write the GGUF cache under {folder.parent} ({e}); set MISTRAL7B_CACHE to a writable folder")
        return None
    try:
        model = build_model(args, read_tensors(path, args), source=path, dtype=torch.float32, device="cpu")
        reference.save(model, scratch)
        os.replace(scratch, folder)  # atomic; a concurrent loader that won the race leaves its copy
    except OSError as e:
        if not folder.is_dir():
            warnings.warn(f"cannot write the GGUF cache {folder} ({e})")
            return None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return folder
