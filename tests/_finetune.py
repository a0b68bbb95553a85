"""Helpers of the fine-tuning tests: a tiny word-level chat tokenizer and model, and a synthetic task."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

import mistral7b

WORDS = [f"w{i}" for i in range(12)]
SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
VOCAB = SPECIALS + ["system", "user", "assistant", "reverse", "."] + WORDS
# ChatML-like; word-level tokens are split on whitespace, so the template needs only spaces.
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|>"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant {% endif %}")


def write_tokenizer(folder: Path) -> Path:
    """tokenizer.json + tokenizer_config.json that `mistral7b.load_tokenizer(folder)` reads."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.add_special_tokens([AddedToken(t, special=True) for t in SPECIALS])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "chat_template": TEMPLATE}))
    return folder


def tiny_args(**overrides) -> mistral7b.ModelArgs:
    return mistral7b.ModelArgs(**{**dict(dim=64, n_layers=2, head_dim=16, hidden_dim=128, n_heads=4, n_kv_heads=2,
                                         norm_eps=1e-5, vocab_size=len(VOCAB), max_seq_len=256), **overrides})


def write_tiny_model(folder: Path, seed: int = 0, **overrides) -> Path:
    """A random tiny model with the tiny tokenizer: a reference folder both `load` and `load_tokenizer` read."""
    torch.manual_seed(seed)
    model = mistral7b.Transformer(tiny_args(**overrides))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.05)
    mistral7b.save(model, folder)
    write_tokenizer(folder)
    return folder


def reverse_task(n: int, seed: int, lengths=(3, 4)) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = rng.choices(WORDS, k=rng.choice(lengths))
        rows.append({"messages": [{"role": "user", "content": "reverse " + " ".join(words)},
                                  {"role": "assistant", "content": " ".join(reversed(words))}]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
