"""mistral7b: an open implementation of the Mistral 7B system in pure PyTorch.

The names below load on first use (PEP 562), so that `mistral7b --help`, and any command that stops
at its flags, answers without importing torch (~1.5 s).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the same names, eagerly, for type checkers and editors
    from .args import PRESETS, ModelArgs
    from .cache import KVCache
    from .errors import CheckpointError, ConfigError, InputError, Mistral7BError
    from .generate import generate
    from .model import Transformer
    from .tokenizer import Tokenizer, load_tokenizer
    from .weights import load, save

__version__ = "0.1.0"

_WHERE = {"ModelArgs": ".args", "PRESETS": ".args", "KVCache": ".cache", "Mistral7BError": ".errors",
          "CheckpointError": ".errors", "ConfigError": ".errors", "InputError": ".errors", "generate": ".generate",
          "Transformer": ".model", "Tokenizer": ".tokenizer", "load_tokenizer": ".tokenizer", "load": ".weights",
          "save": ".weights"}

__all__ = ["ModelArgs", "PRESETS", "Transformer", "KVCache", "load", "save", "generate",
           "Mistral7BError", "CheckpointError", "ConfigError", "InputError", "__version__"]
__all__ += ["Tokenizer", "load_tokenizer"]


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'mistral7b' has no attribute '{name}'")
    value = getattr(importlib.import_module(_WHERE[name], __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])
