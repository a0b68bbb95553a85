"""Requests and their sequences as the engine tracks them, and what a step reports back."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import torch

from ..sampling import SamplingParams
from ..speculative import Backoff
from ..structured import Grammar
from ..streaming import StopStrings

_ids = itertools.count()


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # the k most likely (token, logprob)
    rank: int = 1  # 1 + how many tokens were more likely


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
    grammar: Grammar | None = None  # params.constraint compiled (by Engine.validate)


class Sequence:
    """One of a request's `n` completions: its cache row, progress and output so far.

    Its context is the prompt and the tokens generated so far; `prefilled` of them are in its cache
    row. Before the first token the whole prompt is fed (the last chunk's logits give that token);
    after it, everything but the newest token (which the next decode step feeds). A sequence that
    lost its row (preempted for blocks) thus re-feeds its context when it gets one back."""

    def __init__(self, request: Request, index: int, decoder, stop_ids: frozenset[int]):
        self.request, self.index = request, index
        self.params = request.params
        self.row: int | None = None
        self.prefilled = 0  # context tokens whose keys and values the cache row holds
        self.tokens: list[int] = []  # generated ids; the last one is not yet fed
        self.block_hashes: list[int] = []  # of the context's full blocks published so far (engine/prefix.py)
        self.cached_tokens = 0  # prompt tokens found in the prefix cache at admission
        self.preempted = False  # lost its row once for blocks (and got or will get it back)
        self.prompt_logprobs: list[TokenLogprob | None] = [None]  # the first prompt token has none
        self.text = ""
        self.finish_reason: str | None = None
        self.decoder = decoder
        self.stops = StopStrings(self.params.stop)
        self.stop_ids = stop_ids
        seed = self.params.seed
        # n > 1 with a seed: sequence i draws from seed + i, so the n samples differ but reproduce.
        self.generator = torch.Generator().manual_seed(seed + index) if seed is not None else None
        self.matcher = request.grammar.matcher() if request.grammar is not None else None  # its grammar state
        self.drafts: list[int] = []  # guessed tokens this step verifies (speculative decoding)
        self.backoff = Backoff()

    @property
    def prompt(self) -> list[int]:
        return self.request.prompt

    @property
    def context(self) -> list[int]:
        return self.request.prompt + self.tokens if self.tokens else self.request.prompt

    @property
    def prefill_end(self) -> int:
        """How far the context is fed before decoding (see the class docstring)."""
        return len(self.prompt) + len(self.tokens) - 1 if self.tokens else len(self.prompt)

    @property
    def prefilling(self) -> bool:
        return self.prefilled < self.prefill_end

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
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache (on the first output)
