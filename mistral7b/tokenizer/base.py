"""The `Tokenizer` interface every backend implements, and incremental decoding for streaming."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterable

from ..errors import InputError

ROLES = ("system", "user", "assistant", "tool")


class ChatTemplateError(InputError):
    """A chat template that cannot be used: not valid Jinja, or given to a tokenizer without Jinja templates."""

    param = "chat_template"


NO_JINJA = "this model's tokenizer takes no Jinja chat template: its chat format is built in (mistral-common)"


class Tokenizer(ABC):
    """Text <-> token ids, chat formatting, and the token ids generation needs.

    `bos_id`/`eos_id` are None when the vocabulary has none; `add_bos`: whether the model expects its
    sequences to start with BOS (raw prompts: `encode(text, bos=tok.add_bos)`); `special_tokens` maps
    the text of each control token (BOS, EOS, `[INST]`, `<|im_end|>`, ...) to its id; `stop_ids` are
    EOS and the chat format's end-of-turn tokens. Backends implement the `_encode*`/`_decode` methods.
    """

    def __init__(self, *, bos_id: int | None, eos_id: int | None, add_bos: bool, vocab_size: int,
                 special_tokens: dict[str, int], stop_ids: Iterable[int]):
        self.bos_id = bos_id
        self.add_bos = add_bos and bos_id is not None
        self.eos_id = eos_id
        self.vocab_size = vocab_size
        self.special_tokens = special_tokens
        self.stop_ids = list(dict.fromkeys(i for i in stop_ids if i is not None))
        self._special_ids = frozenset(special_tokens.values())
        # Longest first, so that a token whose text starts with another's is found whole; "(?!)": none.
        longest_first = sorted(special_tokens, key=len, reverse=True)
        self._special_text = re.compile("|".join(map(re.escape, longest_first)) or "(?!)")

    @abstractmethod
    def _encode(self, text: str, special: bool) -> list[int]:
        """Text, no BOS. special=False: special-token text like "</s>" stays text, so prompts cannot forge
        them; True: it becomes its token, as llama.cpp and transformers tokenize a prompt."""

    @abstractmethod
    def _decode(self, ids: list[int]) -> str:
        """Text of ids that are all in the vocabulary and not special."""

    @abstractmethod
    def _encode_chat(self, messages: list[dict], tools: list[dict] | None, *, add_generation_prompt: bool,
                     continue_final_message: bool, chat_template: str | None) -> list[int]:
        """The whole conversation in the model's format; message contents stay text (see `_encode`);
        `tools`: OpenAI function definitions the model may call (tools.py)."""

    def encode(self, text: str, *, bos: bool = False, special: bool = False) -> list[int]:
        """`special`: parse special-token text ("<|im_start|>", "[INST]") into those tokens, for prompts a
        client formatted itself. A text that starts with BOS already gets no second one."""
        if bos and self.bos_id is None:
            raise InputError("this tokenizer has no BOS token; encode with bos=False")
        ids = self._encode(text, special)
        return [self.bos_id, *ids] if bos and ids[:1] != [self.bos_id] else ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; special tokens and ids outside the vocabulary (padded embeddings) decode to nothing."""
        return self._decode([i for i in ids if self.is_text(i)])

    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None, *, add_generation_prompt: bool = True,
                    continue_final_message: bool = False, chat_template: str | None = None) -> list[int]:
        """`messages` as the OpenAI API gives them: [{"role": "system"|"user"|"assistant"|"tool", "content": ...}]
        (assistant turns may carry `tool_calls`, tool turns a `tool_call_id`); `tools`: the functions it may call.

        As vLLM and transformers take them: `add_generation_prompt` ends with the assistant's turn opened
        (a Mistral format always does); `continue_final_message` leaves the last message open, for the
        model to continue it (assistant prefill); `chat_template` renders with this Jinja template
        instead of the model's (Hugging Face and GGUF tokenizers only)."""
        if not messages:
            raise InputError("a chat needs at least one message")
        if add_generation_prompt and continue_final_message:
            raise InputError("continue_final_message needs add_generation_prompt off: the last message is "
                             "continued, no new turn is opened")
        return self._encode_chat([_plain_message(m, i) for i, m in enumerate(messages)], tools or None,
                                 add_generation_prompt=add_generation_prompt,
                                 continue_final_message=continue_final_message, chat_template=chat_template)

    def set_chat_template(self, template: str, source: str) -> None:
        """Render every chat with `template` (Jinja) from now on; `source` names it in errors."""
        raise ChatTemplateError(f"{source}: {NO_JINJA}")

    def is_text(self, token_id: int) -> bool:
        """True for a token that decodes to text (not a special token, inside the vocabulary)."""
        return 0 <= token_id < self.vocab_size and token_id not in self._special_ids

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)


def role_error(message, index: int) -> str:
    """What is wrong with a message whose role is not one of ROLES: the role it has, named."""
    if isinstance(message, dict) and "role" in message:
        return f"unknown role {message['role']!r} in message {index}: a message needs a role among {', '.join(ROLES)}"
    return f"message {index} needs a role among {', '.join(ROLES)}"


def _plain_message(message: dict, index: int) -> dict:
    """Check one OpenAI message and flatten list-of-parts content into one string."""
    if not isinstance(message, dict) or message.get("role") not in ROLES:
        raise InputError(role_error(message, index))
    content = message.get("content")
    if isinstance(content, list):
        if any(not isinstance(p, dict) or p.get("type") != "text" for p in content):
            raise InputError(f"message {index}: only text content parts are supported")
        content = "".join(p.get("text", "") for p in content)
    if content is not None and not isinstance(content, str):
        raise InputError(f"message {index}: content must be a string or a list of text parts")
    return {**message, "content": content}


class StreamDecoder:
    """Turns ids, pushed one at a time, into text pieces that concatenate to `decode(all ids)`.

    Each push decodes a short window, the ids of the last piece returned (the context) and those after
    them, and returns the text the later ids add to the context's; so the cost per token stays constant.
    Text is held back while it ends in U+FFFD: a character whose UTF-8 bytes span several tokens. The
    context always holds a text token, because SentencePiece drops the leading space of the first text
    token it decodes, and that must be the same token in the window as in the full decode.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._window: list[int] = []
        self._emitted = 0  # how many ids of the window are the context (already returned as text)

    def push(self, token_id: int) -> str:
        self._window.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """The text held back at the end (only an incomplete UTF-8 sequence can be held)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        text = self._tokenizer.decode(self._window)
        if text.endswith("\ufffd") and not final:
            return ""
        piece = text[len(self._tokenizer.decode(self._window[:self._emitted])):]
        new = self._window[self._emitted:]
        if any(self._tokenizer.is_text(i) for i in new):
            self._window = new
        self._emitted = len(self._window)
        return piece
