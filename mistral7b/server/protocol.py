"""Request bodies of the OpenAI-compatible API (the OpenAI fields plus vLLM's sampling extras)."""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from ..sampling import SamplingError, SamplingParams
from ..structured import Constraint, ConstraintError


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
    prompt_logprobs: int | None = None  # vLLM's: the prompt tokens' log-probabilities and this many alternatives
    # Structured outputs: OpenAI's response_format, vLLM's structured_outputs and its older guided_* fields.
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: Union[dict[str, Any], str, None] = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def sampling(self, *, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None = None,
                 constraint: Constraint | None = None) -> SamplingParams:
        """constraint: one the route made (tool calls), else the request's own structured output."""
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return SamplingParams(
            max_tokens=max_tokens, temperature=1.0 if self.temperature is None else self.temperature,
            top_p=self.top_p, top_k=self.top_k, min_p=self.min_p, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, repetition_penalty=self.repetition_penalty, seed=self.seed,
            stop=tuple(stop), stop_token_ids=tuple(self.stop_token_ids or ()), ignore_eos=self.ignore_eos,
            n=self.n, logprobs=logprobs, prompt_logprobs=prompt_logprobs, logit_bias=self._token_bias(),
            constraint=constraint or self.constraint())

    def constraint(self) -> Constraint | None:
        """The one structured-output constraint the request asks for, if any."""
        asked = [c for c in (self._response_format(), *self._structured_outputs()) if c is not None]
        if len(asked) > 1:
            raise ConstraintError(asked[1].param, "ask for one structured output at a time (response_format, "
                                                  "structured_outputs or guided_*)")
        return asked[0] if asked else None

    def _response_format(self) -> Constraint | None:
        fmt = self.response_format
        if fmt is None:
            return None
        kind = fmt.get("type")
        if kind == "json_object":
            return Constraint.json_schema({"type": "object"}, "response_format")
        if kind == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict) or "schema" not in spec:
                raise ConstraintError("response_format", "response_format.json_schema needs a `schema`")
            return Constraint.json_schema(spec["schema"], "response_format")
        if kind == "text":
            return None
        raise ConstraintError("response_format",
                              f"response_format.type must be text, json_object or json_schema, got {kind!r}")

    def _structured_outputs(self) -> list[Constraint]:
        fields = {f"guided_{k}": v for k, v in (("json", self.guided_json), ("regex", self.guided_regex),
                                                 ("choice", self.guided_choice), ("grammar", self.guided_grammar))}
        asked = [(name, name.removeprefix("guided_"), v) for name, v in fields.items() if v is not None]
        if not isinstance(self.structured_outputs, (dict, type(None))):
            raise ConstraintError("structured_outputs", "structured_outputs must be an object")
        for key, value in (self.structured_outputs or {}).items():
            if key not in _STRUCTURED_KEYS:
                raise ConstraintError("structured_outputs", f"structured_outputs.{key} is not supported "
                                                            f"(supported: {', '.join(_STRUCTURED_KEYS)})")
            if value is not None and value is not False:
                asked.append(("structured_outputs", key, value))
        return [_constraint(param, key, value) for param, key, value in asked]

    def _token_bias(self) -> dict[int, float] | None:
        """OpenAI's logit_bias has token ids as JSON keys, so strings: "42" -> 42."""
        try:
            return {int(k): v for k, v in self.logit_bias.items()} if self.logit_bias else None
        except ValueError:
            raise SamplingError("logit_bias", "logit_bias keys must be token ids (integers)") from None


_STRUCTURED_KEYS = ("json", "json_object", "regex", "choice", "grammar")


def _constraint(param: str, key: str, value) -> Constraint:
    """One structured-output field -> its Constraint (vLLM's meanings)."""
    if key == "json":
        return Constraint.json_schema(value, param)
    if key == "json_object":
        return Constraint.json_schema({"type": "object"}, param)
    if key == "choice":
        return Constraint.choice(value, param)
    if not isinstance(value, str) or not value:
        raise ConstraintError(param, f"{param}: the {key} must be a non-empty string")
    return Constraint(key, value, param)


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
    tool_choice: Union[str, dict[str, Any], None] = None
    safe_prompt: bool = False  # Mistral's API: prepend the guardrail system prompt (guardrails.py)
    parallel_tool_calls: bool = True


class ModerationRequest(BaseModel):
    model: str | None = None
    input: Union[str, list[str]]


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
