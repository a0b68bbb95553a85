"""What mistral7b uses of the `gguf` package (llama.cpp's Python library), imported here, once.

`import gguf` runs the package's converter modules, and its vocab module imports mistral_common's
tokenizers, ~0.5 s, a sixth of a chat's start, for `MistralVocab`, a converter class mistral7b never
calls. So when nothing has imported mistral_common yet, gguf is imported with it hidden:
gguf.vocab records it as missing and the rest of gguf is whole. mistral_common itself is untouched
and imports as usual afterwards (a Mistral tokenizer does). Import gguf's names from this module,
never from `gguf` directly, or the first import may pay the full cost.
"""

import sys

if "gguf" not in sys.modules and "mistral_common" not in sys.modules:
    sys.modules["mistral_common"] = None  # `import mistral_common.x` now raises ImportError
    try:
        import gguf  # noqa: F401
    finally:
        del sys.modules["mistral_common"]

from gguf import (GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGMLQuantizationType,  # noqa: E402
                  GGUFValueType, Keys, TokenType)
from gguf.quants import dequantize  # noqa: E402

__all__ = ["GGML_QUANT_SIZES", "GGUF_DEFAULT_ALIGNMENT", "GGUF_MAGIC", "GGMLQuantizationType", "GGUFValueType",
           "Keys", "TokenType", "dequantize"]
