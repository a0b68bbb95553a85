"""Speculative decoding: guess the next tokens cheaply, check them all in one forward of the model.

On a CPU one decode step reads every weight once, for one token; a step that also feeds K guessed
tokens reads them once for K + 1 positions, so each accepted guess is a token almost for free. The
engine (engine/engine.py) feeds a sequence's newest token and its guesses as one piece, keeps the
longest run of guesses the model agrees with, and cuts the rest out of the cache.

Proposer here: prompt lookup (n-gram), as vLLM's `ngram` and llama.cpp's lookup decoding: the
continuation of the latest earlier occurrence of the context's last n tokens (n from `ngram_max`
down to `ngram_min`), which pays on input-grounded work (summaries, edits, quoting answers).

Acceptance keeps the output's distribution exactly (`verify`): greedy rows accept a guess while it
is the argmax; sampled rows accept guess x with probability p(x) (the proposer's distribution is a
point mass on x), and after a rejection draw from p with x removed, renormalized (the standard
rejection-sampling rule of Leviathan et al. and Chen et al., 2023).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .sampling import SamplingParams, greedy, probabilities

METHODS = ("ngram",)


@dataclass(frozen=True)
class SpeculativeConfig:
    """method: "ngram" (prompt lookup); num_tokens: guesses per step (K); ngram_min/max: the suffix
    lengths looked up; max_batch: speculate only while at most this many sequences decode (a larger
    batch already reads each weight for many tokens, and guesses would only add work)."""

    method: str = "ngram"
    num_tokens: int = 5
    ngram_min: int = 2
    ngram_max: int = 4
    max_batch: int = 4

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"speculative method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not 1 <= self.num_tokens <= 31:
            raise ValueError(f"num_speculative_tokens must be in [1, 31], got {self.num_tokens}")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError(f"need 1 <= ngram_min <= ngram_max, got {self.ngram_min} and {self.ngram_max}")


def propose_ngram(context: list[int], k: int, n_min: int, n_max: int) -> list[int]:
    """The up to k tokens that followed the latest earlier occurrence of the context's last n tokens,
    for the longest n in [n_min, n_max] that occurs; [] when none does."""
    tokens = np.asarray(context, dtype=np.int64)
    length = len(tokens)
    for n in range(min(n_max, length - 1), n_min - 1, -1):
        suffix = tokens[length - n:]
        # Windows of n tokens that start before the suffix does and are followed by at least one token.
        windows = np.lib.stride_tricks.sliding_window_view(tokens[:length - 1], n)
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        hits = hits[hits + n < length]
        if len(hits):
            start = int(hits[-1]) + n
            return tokens[start:start + k].tolist()
    return []


class Backoff:
    """Per sequence: after a guess that is rejected outright, skip proposing for a while (1, 2, 4 ...
    up to 16 steps), so text that does not repeat its input costs little more than plain decoding."""

    def __init__(self):
        self.wait = 0
        self.skip = 0

    def ready(self) -> bool:
        if self.skip:
            self.skip -= 1
            return False
        return True

    def record(self, accepted: int) -> None:
        if accepted:
            self.wait = 0
        else:
            self.wait = min(16, max(1, 2 * self.wait))
            self.skip = self.wait


def verify(logits: torch.Tensor, drafts: list[int], params: SamplingParams,
           generator: torch.Generator | None) -> list[int]:
    """logits [len(drafts) + 1, vocab]: row j scores the position after drafts[:j] -> the tokens to
    emit: the accepted guesses, then one token of the model's own (the correction of the first
    rejected guess, or the token after the last one). Same distribution as decoding one at a time."""
    if params.greedy:
        choices = greedy(logits).tolist()
        accepted = 0
        while accepted < len(drafts) and drafts[accepted] == choices[accepted]:
            accepted += 1
        return drafts[:accepted] + [choices[accepted]]
    probs = probabilities(logits, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                          min_p=params.min_p)  # [len(drafts) + 1, vocab]
    for j, guess in enumerate(drafts):
        u = torch.rand(1, generator=generator).item()
        if u < probs[j, guess].item():
            continue
        residual = probs[j].clone()
        residual[guess] = 0.0
        if residual.sum() <= 0:  # rounding: p is a point mass on the guess, which is then accepted
            continue
        return drafts[:j] + [int(torch.multinomial(residual, 1, generator=generator))]
    return drafts + [int(torch.multinomial(probs[-1], 1, generator=generator))]
