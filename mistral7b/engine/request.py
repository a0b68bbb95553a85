"""Requests and their sequences as the engine tracks them, and what a step reports back."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import torch

from ..sampling import SamplingParams
from ..streaming import StopStrings

_ids = itertools.count()


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # the k most likely (token, logprob)


@dataclass
class Request:
    """One prompt and how to continue it. `n` sequences are sampled from it.

    `row`: continue the sequence already held in this (reserved) cache row, e.g. a chat turn; the
    row is then kept when the request ends. Otherwise the engine takes free rows and frees them.
    """

    prompt: list[int]
    params: SamplingParams
    request_id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    row: int | None = None
    arrival: float = field(default_factory=time.monotonic)


class Sequence:
    """One of a request's `n` completions: its cache row, progress and output so far."""

    def __init__(self, request: Request, index: int, decoder, stop_ids: frozenset[int]):
        self.request, self.index = request, index
        self.params = request.params
        self.row: int | None = None
        self.prefilled = 0  # prompt tokens already fed
        self.tokens: list[int] = []  # generated ids; the last one is not yet fed
        self.prompt_logprobs: list[TokenLogprob | None] = [None]  # the first prompt token has none
        self.text = ""
        self.finish_reason: str | None = None
        self.decoder = decoder
        self.stops = StopStrings(self.params.stop)
        self.stop_ids = stop_ids
        seed = self.params.seed
        # n > 1 with a seed: sequence i draws from seed + i, so the n samples differ but reproduce.
        self.generator = torch.Generator().manual_seed(seed + index) if seed is not None else None

    @property
    def prompt(self) -> list[int]:
        return self.request.prompt

    @property
    def prefilling(self) -> bool:
        return self.prefilled < len(self.prompt)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class SequenceOutput:
    """What one step produced for one sequence."""

    request_id: str
    index: int  # choice index among the request's n
    new_tokens: list[int]
    new_text: str
    new_logprobs: list[TokenLogprob]  # one per new token when params.logprobs is set, else empty
    finish_reason: str | None  # "stop", "length", "abort", "error" or None while running
    prompt_logprobs: list[TokenLogprob | None] | None = None  # once, when the prompt is done (if asked)
    arrival: float = 0.0  # the request's time.monotonic() on arrival (for latency metrics)
    error: str | None = None  # why the sequence failed (finish_reason "error")
