"""Streaming text completions: token ids in, text pieces out, with stop tokens and stop strings.

Shared by the `generate` and `chat` commands (and the chat session), so streaming, stopping and
timing behave the same everywhere.
"""

from __future__ import annotations

import time
from typing import Iterator

from .cache import KVCache
from .generate import stream_tokens
from .model import Transformer
from .sampling import SamplingParams
from .streaming import StopStrings


class CompletionStream:
    """Iterate to get text pieces as they are generated; afterwards `tokens`, `text`,
    `finish_reason` ("stop" or "length") and timings describe the completion.

    `tokens` holds every sampled id, the stop token included; the last one has not been fed through
    the model (its K/V are not in the cache), so `fed_tokens` are all but the last.
    """

    def __init__(self, model: Transformer, tokenizer, prompt_ids: list[int], params: SamplingParams, *,
                 chunk_size: int | None = None, cache: KVCache | None = None, row: int = 0):
        self.model, self.tokenizer, self.prompt_ids, self.params = model, tokenizer, prompt_ids, params
        self.chunk_size, self.cache, self.row = chunk_size, cache, row
        self.tokens: list[int] = []
        self.text = ""
        self.finish_reason = "length"
        self.prompt_seconds = self.decode_seconds = 0.0

    @property
    def fed_tokens(self) -> list[int]:
        return self.tokens[:-1]

    @property
    def tokens_per_second(self) -> float:
        return (len(self.tokens) - 1) / self.decode_seconds if self.decode_seconds > 0 and len(self.tokens) > 1 else 0.0

    def __iter__(self) -> Iterator[str]:
        tok = self.tokenizer
        stop_ids = set(tok.stop_ids) if tok is not None else set()
        decoder = tok.stream_decoder() if tok is not None else None
        stops = StopStrings(self.params.stop)
        started = time.perf_counter()
        steps = stream_tokens([self.prompt_ids], self.model, max_tokens=self.params.max_tokens,
                              temperature=self.params.temperature, top_p=self.params.top_p, top_k=self.params.top_k,
                              seed=self.params.seed, chunk_size=self.chunk_size, stop_ids=stop_ids,
                              cache=self.cache, rows=None if self.cache is None else [self.row])
        first_at = None
        for (event,) in steps:
            if first_at is None:
                first_at = time.perf_counter()
                self.prompt_seconds = first_at - started
            self.tokens.append(event.token)
            self.decode_seconds = time.perf_counter() - first_at
            if event.token in stop_ids:
                self.finish_reason = "stop"
                break
            if decoder is None:
                continue
            piece = stops.push(decoder.push(event.token))
            self.text += piece
            if piece:
                yield piece
            if stops.stopped:
                self.finish_reason = "stop"
                break
        steps.close()
        tail = stops.flush() if not stops.stopped else ""
        if tail:
            self.text += tail
            yield tail
