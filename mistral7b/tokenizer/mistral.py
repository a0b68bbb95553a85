"""Mistral's own tokenizer files (`tokenizer.model.v*` SentencePiece, `tekken*.json`) through mistral-common,
whose instruct request encoding is the reference for Mistral chat prompts."""

from __future__ import annotations

from pathlib import Path

from mistral_common.exceptions import MistralCommonException
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from mistral_common.tokens.tokenizers.tekken import is_tekkenizer

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

    def _encode_chat(self, messages: list[dict], tools: list[dict] | None, *, add_generation_prompt: bool,
                     continue_final_message: bool, chat_template: str | None) -> list[int]:
        # add_generation_prompt changes nothing: a Mistral prompt always ends ready for the answer.
        if chat_template is not None:
            raise ChatTemplateError(NO_JINJA)
        try:
            request = ChatCompletionRequest.from_openai(messages, tools=tools,
                                                        continue_final_message=continue_final_message)
            return self._mistral.encode_chat_completion(request).tokens
        except (MistralCommonException, ValueError) as e:  # pydantic's ValidationError is a ValueError
            raise InputError(f"the chat does not fit the Mistral instruct format: {e}") from None

    def byte_vocabulary(self):
        """The vocabulary as llguidance's TokenizerWrapper reads it (structured outputs): each token's
        bytes, the special ids, and an encoder."""
        if is_tekkenizer(self._raw):
            from mistral_common.guidance.tokenizer import MistralLLGTokenizer
            return MistralLLGTokenizer(self._raw)
        return _SentencePieceBytes(self)


class _SentencePieceBytes:
    """A SentencePiece vocabulary's bytes: '▁' is a space, `<0xAB>` pieces are single bytes; control
    tokens keep their names, with llguidance's angle brackets ([INST] -> <INST>). Text is encoded
    greedily, longest token first, with no dummy prefix: llguidance reads a leading space that
    SentencePiece adds as part of the text and then masks the wrong tokens."""

    def __init__(self, tokenizer: MistralCommonTokenizer):
        raw = tokenizer._raw
        self.bos_token_id, self.eos_token_id = raw.bos_id, raw.eos_id
        self.special_token_ids = sorted(tokenizer.special_tokens.values())
        special = set(self.special_token_ids)
        self.tokens = [_piece_bytes(raw.id_to_piece(i), i in special) for i in range(raw.n_words)]
        self._ids = {}
        for i, piece in enumerate(self.tokens):
            if i not in special:
                self._ids.setdefault(piece, i)
        self._longest = max(map(len, self._ids))

    def __call__(self, text: str | bytes) -> list[int]:
        data = text.encode() if isinstance(text, str) else text
        ids, i = [], 0
        while i < len(data):  # every byte has a token (<0x00>..<0xFF>), so some prefix always matches
            j = next(j for j in range(min(len(data), i + self._longest), i, -1) if data[i:j] in self._ids)
            ids.append(self._ids[data[i:j]])
            i = j
        return ids


def _piece_bytes(piece: str, special: bool) -> bytes:
    if special:
        return f"<{piece.strip('[]<>')}>".encode()
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        return bytes([int(piece[3:5], 16)])
    return piece.replace("\u2581", " ").encode()
