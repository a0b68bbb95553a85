"""Tokenizers: one `Tokenizer` interface over mistral-common (Mistral's own files), Hugging Face
`tokenizer.json` and the vocabulary embedded in GGUF files. `load_tokenizer(path)` picks the backend."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

from ..defaults import default_model_path
from ..errors import CheckpointError
from .base import StreamDecoder, Tokenizer

__all__ = ["Tokenizer", "StreamDecoder", "load_tokenizer", "find_tokenizer_file"]

# mistral-common's file names: tokenizer.model.v3, mistral_instruct_tokenizer_240323.model.v3m1, tekken.json
_MISTRAL_FILE = re.compile(r".*\.model(\.v\d+(m\d+)?)?$|tekken.*\.json$")


def load_tokenizer(path: str | os.PathLike | None = None) -> Tokenizer:
    """The tokenizer of a model folder, a GGUF file or a tokenizer file; None: the built-in default model."""
    path = Path(path) if path is not None else default_model_path()
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    file = find_tokenizer_file(path) if path.is_dir() else path
    kind, load = _backend(file)
    try:
        return load(file)
    except CheckpointError:
        raise
    except Exception as e:  # sentencepiece, tiktoken, json and the Rust tokenizers each fail their own way
        raise CheckpointError(f"{file}: not a readable {kind} tokenizer ({type(e).__name__}: {e})") from None


def find_tokenizer_file(folder: Path) -> Path:
    """A folder's tokenizer: Mistral's versioned files first (their chat format is the reference),
    then Hugging Face's tokenizer.json, then a bare tokenizer.model, then a single GGUF file."""
    versioned = sorted(folder.glob("tekken*.json")) or sorted(
        folder.glob("*.model.v[0-9]*"), key=lambda p: int(re.search(r"\.v(\d+)", p.name).group(1)))
    candidates = [*versioned[-1:], folder / "tokenizer.json", folder / "tokenizer.model"]
    ggufs = sorted(folder.glob("*.gguf"))
    for file in candidates + (ggufs if len(ggufs) == 1 else []):
        if file.is_file():
            return file
    raise CheckpointError(f"{folder}: no tokenizer found (tokenizer.model.v*, tekken.json, tokenizer.json or "
                          "tokenizer.model); copy the model's tokenizer file into the folder, or pass its path (on the command "
                          "line: --tokenizer PATH)")


def _backend(file: Path) -> tuple[str, Callable[[Path], Tokenizer]]:
    # Backends are imported when used: mistral-common alone takes ~1 s to import.
    if file.suffix == ".gguf":
        from .gguf import load
        return "GGUF", load
    if _MISTRAL_FILE.match(file.name):
        from .mistral import MistralCommonTokenizer
        return "Mistral", MistralCommonTokenizer
    if file.suffix == ".json":
        from .hf import load_folder
        return "Hugging Face", load_folder
    raise CheckpointError(f"{file}: not a tokenizer file (expected tokenizer.model*, tekken*.json, "
                          "tokenizer.json or a .gguf file)")
