"""`describe(path)`: what a checkpoint is, read from its config and tensor headers only."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

from safetensors import safe_open

from ..defaults import default_model_path
from . import READERS, detect_format
from .gguf import open_file


def _tensor_types(files: list[Path]) -> Counter:
    types: Counter = Counter()
    for file in files:
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt") as f:
                types.update(str(f.get_slice(name).get_dtype()) for name in f.keys())
        elif file.suffix == ".gguf":
            types.update(t.type.name for t in open_file(file).tensors.values())
    return types


def describe(path: str | os.PathLike | None) -> dict[str, Any]:
    """Numbers as numbers (parameters, bytes on disk; None for what the checkpoint does not say),
    for scripts; `mistral7b info` prints them for people."""
    path = Path(path) if path is not None else default_model_path()
    fmt = detect_format(path)
    reader = READERS[fmt]
    args = reader.read_args(path)
    files = reader.weight_files(path)
    size = sum(f.stat().st_size for f in files)
    return {
        "path": str(path),
        "format": fmt,
        "parameters": args.n_params,
        "layers": args.n_layers,
        "dim": args.dim,
        "heads": args.n_heads,
        "kv_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "ffn_hidden": args.hidden_dim,
        "vocab_size": args.vocab_size,
        "sliding_window": args.sliding_window,
        "context": args.max_seq_len,
        "rope_theta": args.rope_theta,
        "tied_embeddings": args.tied_embeddings,
        "tensor_types": dict(_tensor_types(files)),
        "size_on_disk": size,
    }
