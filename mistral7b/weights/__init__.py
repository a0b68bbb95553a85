"""Checkpoint formats: `load(path)` detects which one a path holds (None: the default model);
`save(model, path, format)`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from ..defaults import default_model_path
from ..errors import CheckpointError
from ..model import Transformer
from . import gguf, hf, reference
from .common import build_model

if TYPE_CHECKING:
    from ..parallel import Shard

FORMATS = ("reference", "hf")  # formats we write; we read these and GGUF
# Each reader module offers read_args(path), weight_files(path) and read_tensors(path, args, part_of=None).
READERS = {"reference": reference, "hf": hf, "gguf": gguf}


def detect_format(path: Path) -> str:
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if reference.is_reference(path):
        return "reference"
    if hf.is_hf(path):
        return "hf"
    if gguf.is_gguf(path):
        return "gguf"
    raise CheckpointError(f"{path}: not a checkpoint (expected a folder with params.json + consolidated.safetensors, "
                          "a folder with config.json + model.safetensors, or a .gguf file)")


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A dtype name as the CLI and configs give it (fp32, bf16, fp16, ...) -> torch dtype; None stays None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16, "half": torch.float16}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(names)}")
    return names[dtype]


def load(path: str | os.PathLike | None, *, dtype: torch.dtype | str | None = None,
         device: torch.device | str | None = None, progress: bool | None = None,
         quantize: str | None = None, group_size: int | None = None, shard: Shard | None = None) -> Transformer:
    """Load a checkpoint of any supported format; path None: the default model (SmolLM2-135M-Instruct).
    dtype: keep the file's when None (GGUF: fp32, dequantized).
    quantize: "int8" or "int4" stores the linear layers' weights quantized (see `mistral7b.quant`;
    group_size: int8 defaults to one scale per output channel, int4 to groups of 32).

    Tensors are read one at a time (memory-mapped) into a model created on the meta device, so
    peak memory is about one copy of the weights. `progress` shows a bar (default: files > 1 GB).
    `shard`: build one tensor-parallel rank's part of the model, reading only its slice of each tensor.
    """
    from ..quant import check_quantize_args, quantize as quantize_model

    check_quantize_args(quantize, group_size)
    path = default_model_path() if path is None else Path(path)
    fmt = detect_format(path)
    module = READERS[fmt]
    full_args = module.read_args(path)
    args = shard.local_args(full_args) if shard else full_args
    files = module.weight_files(path)
    packed = {"packed": True} if quantize and fmt == "gguf" else {}  # Q8_0/Q4_x blocks stay as they are
    tensors = module.read_tensors(path, args, shard.part_of if shard else None, **packed)
    total = sum(f.stat().st_size for f in files)
    show = progress if progress is not None else total > 2**30
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"loading {path.name}", disable=not show) as bar:
        model = build_model(args, tensors, source=path, dtype=parse_dtype(dtype), device=device, progress=bar.update)
    if shard:
        model = shard.parallelize(model, full_args)
    return quantize_model(model, quantize, group_size) if quantize else model


def save(model: Transformer, path: str | os.PathLike, format: str = "reference") -> None:
    """Write `model` as a reference folder (params.json + consolidated.safetensors) or an HF folder."""
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; choose one of {FORMATS}")
    (reference.save if format == "reference" else hf.save)(model, Path(path))
