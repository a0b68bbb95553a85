"""Mistral's own tokenizer files (`tokenizer.model.v*` SentencePiece, `tekken*.json`) through mistral-common,
whose instruct request encoding is the reference for Mistral chat prompts."""

from __future__ import annotations

from pathlib import Path

from mistral_common.exceptions import MistralCommonException
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from ..errors import InputError
from .base import Tokenizer


class MistralCommonTokenizer(Tokenizer):
    def __init__(self, path: Path):
        self._mistral = MistralTokenizer.from_file(str(path))
        self._raw = raw = self._mistral.instruct_tokenizer.tokenizer
        super().__init__(bos_id=raw.bos_id, eos_id=raw.eos_id, add_bos=True, vocab_size=raw.n_words,
                         special_tokens={raw.id_to_piece(i): i for i in sorted(raw.special_ids)},
                         stop_ids=[raw.eos_id])  # every Mistral chat format ends the assistant's turn with EOS

    def _encode(self, text: str) -> list[int]:
        return self._raw.encode(text, bos=False, eos=False)

    def _decode(self, ids: list[int]) -> str:
        return self._raw.decode(ids)

    def _encode_chat(self, messages: list[dict]) -> list[int]:
        try:
            request = ChatCompletionRequest.from_openai(messages)
            return self._mistral.encode_chat_completion(request).tokens
        except (MistralCommonException, ValueError) as e:  # pydantic's ValidationError is a ValueError
            raise InputError(f"the chat does not fit the Mistral instruct format: {e}") from None
