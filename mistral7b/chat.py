"""A multi-turn chat that keeps its KV cache between turns.

Each turn encodes the whole conversation with the model's chat format (so the format stays the
tokenizer's business), then feeds only the tokens after the longest prefix already in the cache.
If an earlier part changed (an assistant answer re-tokenised differently), the cache is cut back to
the common prefix, or rebuilt when the rolling buffer has already evicted what that would need.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

from .completion import CompletionStream
from .engine import Engine
from .guardrails import with_safe_prompt
from .model import Transformer
from .sampling import SamplingParams
from .tools import ToolCall, check_tools, split_output, tool_format


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class ChatSession:
    def __init__(self, model: Transformer, tokenizer, params: SamplingParams, *, system: str | None = None,
                 max_len: int | None = None, chunk_size: int | None = None, tools: list[dict] | None = None,
                 safe_prompt: bool = False, speculative=None):
        """tools: OpenAI function definitions the model may call ("auto"); its calls are parsed into
        `last_calls`, and `send_tool_result` answers them. safe_prompt: Mistral's guardrail system prompt
        before the system prompt (guardrails.py). speculative: a SpeculativeConfig (speculative.py)."""
        self.tokenizer, self.system, self.safe_prompt = tokenizer, system, safe_prompt
        self.tools = check_tools(tools) if tools else None
        self.calls = tool_format(tokenizer) if self.tools else None
        if self.calls is not None:
            params = dataclasses.replace(params, constraint=self.calls.constraint(self.tools, "auto", None, True))
        self.params = params
        self.last_calls: list[ToolCall] = []  # the calls of the last answer, until their results are sent
        self.engine = Engine(model, tokenizer, max_num_seqs=1, max_model_len=max_len, chunk_size=chunk_size,
                             speculative=speculative)
        self.row = self.engine.reserve_row()  # the conversation's sequence, kept between turns
        self.reset()

    def reset(self) -> None:
        """Start a new conversation (the system prompt stays)."""
        self.messages: list[dict] = [{"role": "system", "content": self.system}] if self.system else []
        if self.safe_prompt:
            self.messages = with_safe_prompt(self.messages)
        self.fed: list[int] = []  # token ids whose keys/values the cache holds, in order
        self.engine.reset(self.row)
        self.last: CompletionStream | None = None

    def close(self) -> None:
        """End the session: its cache row goes back to the engine."""
        self.engine.release_row(self.row)
        self.row = None

    def _reuse_cache(self, ids: list[int]) -> list[int]:
        """Make the cache hold a prefix of `ids`; return the tokens still to feed (at least one)."""
        keep = min(_common_prefix(self.fed, ids), len(ids) - 1)
        if keep < len(self.fed) and not self.engine.rewind(self.row, keep):
            self.engine.reset(self.row)
            keep = 0
        self.fed = ids[:keep]
        return ids[keep:]

    def send(self, text: str) -> Iterator[str]:
        """Add a user turn and stream the assistant's answer. Interrupting the stream (Ctrl-C) keeps
        the partial answer in the conversation; an error before any answer drops the turn."""
        self.messages.append({"role": "user", "content": text})
        yield from self._answer()

    def send_tool_result(self, text: str) -> Iterator[str]:
        """Answer the last answer's tool calls (each with `text`) and stream what the model says next."""
        if not self.last_calls:
            raise ValueError("the last answer called no tool")
        self.messages += [{"role": "tool", "tool_call_id": call.id, "content": text} for call in self.last_calls]
        yield from self._answer()

    def _answer(self) -> Iterator[str]:
        if self.row is None:
            raise RuntimeError("this chat session is closed")
        self.last_calls = []
        ids = self.tokenizer.encode_chat(self.messages, self.tools)
        new = self._reuse_cache(ids)
        completion = CompletionStream(self.engine, new, self.params, row=self.row)
        self.last = completion
        consistent = False  # does the cache row hold exactly ids + fed_tokens afterwards?
        try:
            yield from completion
            consistent = True
        except GeneratorExit:  # the caller stopped reading between tokens: nothing was half-done
            consistent = True
            raise
        finally:
            if consistent:
                self.fed = ids + completion.fed_tokens
            else:  # an exception may have landed inside a forward that wrote some layers only
                self.engine.reset(self.row)
                self.fed = []
            if completion.tokens:
                self.messages.append(self._assistant_message(completion))
            else:
                self.messages.pop()

    def _assistant_message(self, completion: CompletionStream) -> dict:
        if self.calls is None:
            return {"role": "assistant", "content": completion.text}
        content, self.last_calls = split_output(self.calls.parser(), completion.tokens, completion.text)
        message = {"role": "assistant", "content": content or ""}
        if self.last_calls:
            message["tool_calls"] = [call.to_openai() for call in self.last_calls]
        return message
