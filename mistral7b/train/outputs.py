"""The tokenizer beside a fully fine-tuned checkpoint, so that `load_tokenizer(DIR)` finds the base model's."""

from ..tokenizer.save import save_tokenizer

__all__ = ["save_tokenizer"]
