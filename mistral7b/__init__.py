"""mistral7b: an open implementation of the Mistral 7B system in pure PyTorch."""

from .args import PRESETS, ModelArgs
from .cache import KVCache
from .errors import CheckpointError, ConfigError, InputError, Mistral7BError
from .generate import generate
from .model import Transformer
from .tokenizer import Tokenizer, load_tokenizer
from .weights import load, save

__version__ = "0.1.0"

__all__ = ["ModelArgs", "PRESETS", "Transformer", "KVCache", "load", "save", "generate",
           "Mistral7BError", "CheckpointError", "ConfigError", "InputError", "__version__"]
__all__ += ["Tokenizer", "load_tokenizer"]
