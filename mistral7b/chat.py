"""A multi-turn chat that keeps its KV cache between turns.

Each turn encodes the whole conversation with the model's chat format (so the format stays the
tokenizer's business), then feeds only the tokens after the longest prefix already in the cache.
If an earlier part changed (an assistant answer re-tokenised differently), the cache is cut back to
the common prefix, or rebuilt when the rolling buffer has already evicted what that would need.
"""

from __future__ import annotations

from typing import Iterator

from .completion import CompletionStream
from .engine import Engine
from .model import Transformer
from .sampling import SamplingParams


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class ChatSession:
    def __init__(self, model: Transformer, tokenizer, params: SamplingParams, *, system: str | None = None,
                 max_len: int | None = None, chunk_size: int | None = None):
        self.tokenizer, self.params, self.system = tokenizer, params, system
        self.engine = Engine(model, tokenizer, max_num_seqs=1, max_model_len=max_len, chunk_size=chunk_size)
        self.row = self.engine.reserve_row()  # the conversation's sequence, kept between turns
        self.reset()

    def reset(self) -> None:
        """Start a new conversation (the system prompt stays)."""
        self.messages: list[dict] = [{"role": "system", "content": self.system}] if self.system else []
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
        if self.row is None:
            raise RuntimeError("this chat session is closed")
        self.messages.append({"role": "user", "content": text})
        ids = self.tokenizer.encode_chat(self.messages)
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
                self.messages.append({"role": "assistant", "content": completion.text})
            else:
                self.messages.pop()
