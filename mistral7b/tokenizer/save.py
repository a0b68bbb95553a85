"""`save_tokenizer(source, out)`: put a model's tokenizer into a folder written by `save`, `merge` or
`finetune --full`, so that both `load_tokenizer(out)` and transformers' `AutoTokenizer` find it.

Folders and tokenizer files are copied as they are (Mistral's `tokenizer.model.v*` and `tekken.json`,
Hugging Face's `tokenizer.json` with its config). A GGUF vocabulary is written as transformers
writes a fast tokenizer: `tokenizer.json` (with the BOS post-processor the model expects) and
`tokenizer_config.json` (special tokens, the chat template).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from tokenizers import Tokenizer as RustTokenizer
from tokenizers import processors

from ..defaults import default_model_path
from ..errors import CheckpointError
from ..gguf_lib import Keys
from . import _MISTRAL_FILE, load_tokenizer

# Hugging Face's tokenizer files; whichever exist beside a tokenizer are copied with it.
_HF_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "chat_template.json",
             "special_tokens_map.json", "tokenizer.model")


def save_tokenizer(source: str | os.PathLike | None, out: str | os.PathLike) -> bool:
    """Write the tokenizer of `source` (a model folder, a .gguf file, a tokenizer file; None: the
    default model) into `out`. Returns False when a folder holds no tokenizer (nothing written)."""
    source = default_model_path() if source is None else Path(source)
    out = Path(out)
    if not source.exists():
        raise CheckpointError(f"{source}: no such file or folder")
    if source.is_dir():
        files = [f for f in sorted(source.iterdir()) if f.is_file() and _is_tokenizer_file(f)]
        ggufs = sorted(source.glob("*.gguf"))
        if not files and len(ggufs) == 1:
            return save_tokenizer(ggufs[0], out)
        _copy(files, out)
        return bool(files)
    if source.suffix == ".gguf":
        _write_gguf_tokenizer(source, out)
    elif _MISTRAL_FILE.match(source.name):
        _copy([source], out)
    else:  # a tokenizer.json, maybe under another name: its config files come along
        load_tokenizer(source)  # fails clearly on a file that is no tokenizer
        shutil.copy2(source, out / "tokenizer.json")
        _copy([source.parent / n for n in _HF_FILES if n != "tokenizer.json" and (source.parent / n).is_file()], out)
    return True


def _is_tokenizer_file(file: Path) -> bool:
    return file.name in _HF_FILES or bool(_MISTRAL_FILE.match(file.name))


def _copy(files: list[Path], out: Path) -> None:
    if files:
        out.mkdir(parents=True, exist_ok=True)
    for file in files:
        shutil.copy2(file, out / file.name)


def _write_gguf_tokenizer(path: Path, out: Path) -> None:
    from ..gguf_file import open_gguf

    tokenizer = load_tokenizer(path)
    backend = RustTokenizer.from_str(tokenizer.backend.to_str())  # a copy: the post-processor is added below
    token = backend.id_to_token
    if tokenizer.add_bos:  # the GGUF says "start with BOS"; in tokenizer.json the post-processor says it
        bos = token(tokenizer.bos_id)
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, tokenizer.bos_id)])
    meta = open_gguf(path).metadata
    K = Keys.Tokenizer
    specials = {name: token(meta[key]) for name, key in (("unk_token", K.UNK_ID), ("pad_token", K.PAD_ID))
                if key in meta and token(meta[key]) is not None}
    added = {str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                      "single_word": t.single_word, "special": t.special}
             for i, t in sorted(backend.get_added_tokens_decoder().items())}
    context = meta.get(f"{meta.get(Keys.General.ARCHITECTURE)}.context_length")
    config = {
        "add_bos_token": tokenizer.add_bos,
        "add_eos_token": False,
        "added_tokens_decoder": added,
        "bos_token": token(tokenizer.bos_id) if tokenizer.bos_id is not None else None,
        "eos_token": token(tokenizer.eos_id) if tokenizer.eos_id is not None else None,
        **specials,
        "chat_template": meta.get(K.CHAT_TEMPLATE),
        "clean_up_tokenization_spaces": False,
        **({"model_max_length": context} if context else {}),
        # The generic fast tokenizer: it runs tokenizer.json as it is, without a model family's own rules.
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    out.mkdir(parents=True, exist_ok=True)
    backend.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                               encoding="utf-8")
