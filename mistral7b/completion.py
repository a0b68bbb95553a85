"""Streaming one text completion through the engine: token ids in, text pieces out.

Shared by the `generate` and `chat` commands, so streaming, stopping and timing behave the same.
"""

from __future__ import annotations

import time
from typing import Iterator

from .engine import Engine, Request
from .sampling import SamplingParams


class CompletionStream:
    """Iterate to get text pieces as they are generated; afterwards `tokens` (every sampled id, a
    stop token included), `text`, `finish_reason` ("stop" or "length") and timings describe it.

    `row`: continue the sequence held in that reserved cache row (a chat turn). The last sampled
    token is never fed through the model, so the row then holds the prompt and `fed_tokens`.
    """

    def __init__(self, engine: Engine, prompt_ids: list[int], params: SamplingParams, *, row: int | None = None):
        self.engine = engine
        self.request = Request(list(prompt_ids), params, row=row)
        self.tokens: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.prompt_seconds = self.decode_seconds = 0.0

    @property
    def fed_tokens(self) -> list[int]:
        return self.tokens[:-1]

    @property
    def tokens_per_second(self) -> float:
        return (len(self.tokens) - 1) / self.decode_seconds if self.decode_seconds > 0 else 0.0

    def __iter__(self) -> Iterator[str]:
        engine, request_id = self.engine, self.request.request_id
        engine.add_request(self.request)
        started = time.perf_counter()
        first_at = None
        try:
            while self.finish_reason is None:
                for out in engine.step():
                    if out.request_id != request_id:
                        continue
                    now = time.perf_counter()
                    if first_at is None:
                        first_at, self.prompt_seconds = now, now - started
                    self.decode_seconds = now - first_at
                    self.tokens += out.new_tokens
                    self.text += out.new_text
                    self.finish_reason = out.finish_reason
                    if out.new_text:
                        yield out.new_text
        finally:
            if self.finish_reason is None:  # the caller stopped early (Ctrl-C, closed stream)
                engine.abort(request_id)
