"""Mistral's own tokenizer files (`tokenizer.model.v*` SentencePiece, `tekken*.json`) through mistral-common,
whose instruct request encoding is the reference for Mistral chat prompts."""

from __future__ import annotations

from pathlib import Path

from mistral_common.exceptions import MistralCommonException
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from ..errors import InputError
from .base import NO_JINJA, ChatTemplateError, Tokenizer


class MistralCommonTokenizer(Tokenizer):
    def __init__(self, path: Path):
        self._mistral = MistralTokenizer.from_file(str(path))
        self._raw = raw = self._mistral.instruct_tokenizer.tokenizer
        super().__init__(bos_id=raw.bos_id, eos_id=raw.eos_id, add_bos=True, vocab_size=raw.n_words,
                         special_tokens={raw.id_to_piece(i): i for i in sorted(raw.special_ids)},
                         stop_ids=[raw.eos_id])  # every Mistral chat format ends the assistant's turn with EOS

    def _encode(self, text: str, special: bool) -> list[int]:
        if not special:
            return self._raw.encode(text, bos=False, eos=False)
        # mistral-common never parses special tokens in text: encode the pieces between them, as
        # llama.cpp does (each piece gets SentencePiece's dummy prefix, as after a control token there).
        ids, start = [], 0
        for match in self._special_text.finditer(text):
            ids += self._raw.encode(text[start:match.start()], bos=False, eos=False)
            ids.append(self.special_tokens[match.group()])
            start = match.end()
        return ids + self._raw.encode(text[start:], bos=False, eos=False)

    def _decode(self, ids: list[int]) -> str:
        return self._raw.decode(ids)

    def _encode_chat(self, messages: list[dict], *, add_generation_prompt: bool, continue_final_message: bool,
                     chat_template: str | None) -> list[int]:
        # add_generation_prompt changes nothing: a Mistral prompt always ends ready for the answer.
        if chat_template is not None:
            raise ChatTemplateError(NO_JINJA)
        try:
            request = ChatCompletionRequest.from_openai(messages, continue_final_message=continue_final_message)
            return self._mistral.encode_chat_completion(request).tokens
        except (MistralCommonException, ValueError) as e:  # pydantic's ValidationError is a ValueError
            raise InputError(f"the chat does not fit the Mistral instruct format: {e}") from None
