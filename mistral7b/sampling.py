"""Sampling parameters and logits processing: penalties, temperature, top-k, top-p, min-p, seeds."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .errors import InputError

if TYPE_CHECKING:
    from .structured import Constraint

# vLLM's bound: a temperature below this is greedy (dividing logits by it overflows to inf).
MIN_TEMPERATURE = 1e-5
SEED_RANGE = (-2**63, 2**63 - 1)  # a signed 64-bit integer, as OpenAI's `seed`
LOGIT_BIAS_RANGE = (-100.0, 100.0)


@dataclass
class SamplingParams:
    """What a caller asks of one completion (the OpenAI/vLLM parameter set)."""

    max_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0  # drop tokens below min_p * p(most likely)
    presence_penalty: float = 0.0  # OpenAI: subtract once for each token already generated
    frequency_penalty: float = 0.0  # OpenAI: subtract per occurrence in the generated text
    repetition_penalty: float = 1.0  # CTRL/HF: divide positive logits of tokens seen (prompt or output)
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings (never part of the returned text)
    stop_token_ids: tuple[int, ...] = ()  # stop tokens besides the tokenizer's EOS / end-of-turn
    ignore_eos: bool = False
    n: int = 1  # independent completions of the same prompt
    logprobs: int | None = None  # None: no logprobs; k: the chosen token's and the k most likely
    prompt_logprobs: int | None = None  # the same for prompt tokens (echo)
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit before sampling
    constraint: Constraint | None = None  # structured output: what the text must match (structured.py)

    def __post_init__(self) -> None:
        if 0 < self.temperature < MIN_TEMPERATURE:
            self.temperature = 0.0
        low, high = LOGIT_BIAS_RANGE
        checks = [
            (self.max_tokens >= 0, "max_tokens", "must be >= 0"),
            (self.temperature >= 0, "temperature", "must be >= 0"),
            (0 < self.top_p <= 1, "top_p", "must be in (0, 1]"),
            (self.top_k >= 0, "top_k", "must be >= 0 (0 = off)"),
            (0 <= self.min_p <= 1, "min_p", "must be in [0, 1]"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty", "must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty", "must be in [-2, 2]"),
            (self.repetition_penalty > 0, "repetition_penalty", "must be > 0"),
            (self.n >= 1, "n", "must be >= 1"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs", "must be between 0 and 20"),
            (self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20, "prompt_logprobs",
             "must be between 0 and 20"),
            (self.seed is None or SEED_RANGE[0] <= self.seed <= SEED_RANGE[1], "seed",
             "must be a signed 64-bit integer"),
            (all(low <= v <= high for v in (self.logit_bias or {}).values()), "logit_bias",
             f"values must be in [{low:g}, {high:g}]"),
        ]
        for ok, name, rule in checks:
            if not ok:
                raise SamplingError(name, f"{name} {rule}, got {getattr(self, name)!r}")

    def check_vocabulary(self, vocab_size: int) -> None:
        """The token ids this asks for (stop_token_ids, logit_bias keys) must be in the vocabulary."""
        for name, ids in (("stop_token_ids", self.stop_token_ids), ("logit_bias", tuple(self.logit_bias or ()))):
            bad = [t for t in ids if not 0 <= t < vocab_size]
            if bad:
                raise SamplingError(name, f"{name} has token id(s) {bad[:5]} outside the vocabulary [0, {vocab_size})")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)


class SamplingError(InputError):
    """A sampling parameter out of range; `param` names it (for API error bodies)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def apply_penalties(logits: torch.Tensor, params: SamplingParams, prompt: list[int], output: list[int]) -> torch.Tensor:
    """logits [vocab] of one sequence -> penalised copy (presence/frequency over the output,
    repetition over prompt and output, as vLLM does)."""
    logits = logits.clone()
    vocab = logits.shape[0]
    if output and (params.presence_penalty or params.frequency_penalty):
        counts = torch.bincount(torch.tensor(output, device=logits.device), minlength=vocab)[:vocab].float()
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).float()
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(prompt) | set(output)), device=logits.device, dtype=torch.long)
        picked = logits[seen]
        logits[seen] = torch.where(picked > 0, picked / params.repetition_penalty, picked * params.repetition_penalty)
    return logits


def apply_logit_bias(logits: torch.Tensor, biases: list[dict[int, float] | None]) -> None:
    """logits [B, vocab], biases[i] for row i (or None) -> add them in place, the batch at once."""
    rows, cols, values = [], [], []
    for i, bias in enumerate(biases):
        for token, value in (bias or {}).items():
            rows.append(i)
            cols.append(token)
            values.append(value)
    if rows:
        index = (torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device))
        logits.index_put_(index, torch.tensor(values, dtype=logits.dtype, device=logits.device), accumulate=True)


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """logits [B, vocab] -> each row's most likely token [B] (the first on ties). Through numpy on the
    CPU: its argmax over a large vocabulary is many times faster than torch's for the few rows of a
    decode step, a visible share of a token's time otherwise (BENCHMARKS.md, "Small measurements")."""
    if logits.is_cpu and logits.dtype == torch.float32 and logits.dim() == 2:
        return torch.from_numpy(logits.numpy().argmax(axis=-1))
    return logits.argmax(dim=-1)


def probabilities(logits: torch.Tensor, *, temperature: float, top_p: float = 1.0, top_k: int = 0,
                  min_p: float = 0.0) -> torch.Tensor:
    """logits [B, vocab] (fp32) -> the distribution sampling draws from [B, vocab]: temperature, then
    top-k, min-p and top-p filtering (not renormalized: torch.multinomial takes weights). temperature > 0."""
    # Huge logits (a tiny repetition_penalty) overflow to inf, and softmax turns inf into NaN.
    logits = torch.nan_to_num(logits / temperature, nan=float("-inf"), posinf=torch.finfo(logits.dtype).max,
                              neginf=float("-inf"))
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if min_p > 0:
        probs = probs.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, 0.0)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = (sorted_probs.cumsum(dim=-1) - sorted_probs) > top_p * sorted_probs.sum(dim=-1, keepdim=True)
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
    return probs


def sample(logits: torch.Tensor, *, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
           min_p: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, vocab] (fp32) -> token ids [B]. temperature 0 is greedy (argmax)."""
    if temperature == 0:
        return greedy(logits)
    probs = probabilities(logits, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
