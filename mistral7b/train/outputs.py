"""The tokenizer beside a fully fine-tuned checkpoint, so that `load_tokenizer(DIR)` finds the base model's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..defaults import default_model_path
from ..tokenizer import find_tokenizer_file, load_tokenizer

# Files that make up a folder's tokenizer (whichever exist are copied).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                    "tokenizer.model")


def save_tokenizer(model_path: str | None, out: Path) -> None:
    source = default_model_path() if model_path is None else Path(model_path)
    if source.is_dir():
        tokenizer_file = find_tokenizer_file(source)
        for file in {tokenizer_file, *(source / name for name in _TOKENIZER_FILES)}:
            if file.is_file():
                shutil.copy2(file, out / file.name)
        return
    # A GGUF file: its vocabulary, rebuilt as a `tokenizers` tokenizer, plus the BOS/EOS and chat template.
    from gguf import GGUFReader

    tokenizer = load_tokenizer(source)
    template = GGUFReader(source).get_field("tokenizer.chat_template")
    tokenizer.backend.save(str(out / "tokenizer.json"))
    config = {
        "bos_token": tokenizer.backend.id_to_token(tokenizer.bos_id) if tokenizer.bos_id is not None else None,
        "eos_token": tokenizer.backend.id_to_token(tokenizer.eos_id) if tokenizer.eos_id is not None else None,
        "chat_template": template.contents() if template is not None else None,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
