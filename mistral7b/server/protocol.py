"""Request bodies of the OpenAI-compatible API (the OpenAI fields plus vLLM's sampling extras)."""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from ..sampling import SamplingError, SamplingParams


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    # Unknown fields (user, ...) are accepted and ignored, as OpenAI clients send them.
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    n: int = 1
    temperature: float | None = None  # OpenAI's default is 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: Union[str, list[str], None] = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None

    def sampling(self, *, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None = None) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return SamplingParams(
            max_tokens=max_tokens, temperature=1.0 if self.temperature is None else self.temperature,
            top_p=self.top_p, top_k=self.top_k, min_p=self.min_p, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, repetition_penalty=self.repetition_penalty, seed=self.seed,
            stop=tuple(stop), stop_token_ids=tuple(self.stop_token_ids or ()), ignore_eos=self.ignore_eos,
            n=self.n, logprobs=logprobs, prompt_logprobs=prompt_logprobs, logit_bias=self._token_bias())

    def _token_bias(self) -> dict[int, float] | None:
        """OpenAI's logit_bias has token ids as JSON keys, so strings: "42" -> 42."""
        try:
            return {int(k): v for k, v in self.logit_bias.items()} if self.logit_bias else None
        except ValueError:
            raise SamplingError("logit_bias", "logit_bias keys must be token ids (integers)") from None


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: int | None = 16  # OpenAI's default for completions
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    parse_special: bool = True  # llama.cpp's name: "<|im_start|>" in a text prompt is that token


class _ChatFormat(BaseModel):
    """How messages become a prompt, with vLLM's names: see `Tokenizer.encode_chat`."""

    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Union[str, list[dict[str, Any]], None] = None


class ChatCompletionRequest(_ChatFormat, _Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    echo: bool = False  # vLLM's: the answer starts with the last message's content when that is the assistant's
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None


class TokenizeRequest(_ChatFormat):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    parse_special: bool = True


class DetokenizeRequest(BaseModel):
    model: str | None = None
    tokens: list[int]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    """Every error body, as OpenAI and vLLM send it."""

    error: ErrorInfo
