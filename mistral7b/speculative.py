"""Speculative decoding: guess the next tokens cheaply, check them all in one forward of the model.

On a CPU one decode step reads every weight once, for one token; a step that also feeds K guessed
tokens reads them once for K + 1 positions, so each accepted guess is a token almost for free. The
engine (engine/engine.py) feeds a sequence's newest token and its guesses as one piece, keeps the
longest run of guesses the model agrees with, and cuts the rest out of the cache.

Proposers: prompt lookup (`ngram`), as vLLM's `ngram` and llama.cpp's lookup decoding: the
continuation of the latest earlier occurrence of the context's last n tokens (n from `ngram_max`
down to `ngram_min`), which pays on input-grounded work (summaries, edits, quoting answers); and a
draft model (`draft`), a smaller model with the same tokenizer whose greedy tokens are the guesses
(it keeps a cache row per sequence, caught up lazily and cut back to what the target accepted).

Acceptance keeps the output's distribution exactly (`verify`): greedy rows accept a guess while it
is the argmax; sampled rows accept guess x with probability p(x) (the proposer's distribution is a
point mass on x), and after a rejection draw from p with x removed, renormalized (the standard
rejection-sampling rule of Leviathan et al. and Chen et al., 2023).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import InputError
from .sampling import SamplingParams, greedy, probabilities

METHODS = ("ngram", "draft")


@dataclass(frozen=True)
class SpeculativeConfig:
    """method: "ngram" (prompt lookup) or "draft" (`draft_model`, a Transformer with the target's
    vocabulary); num_tokens: guesses per step (K); ngram_min/max: the suffix lengths looked up;
    max_batch: speculate only while at most this many sequences decode (a larger batch already reads
    each weight for many tokens, and guesses would only add work)."""

    method: str = "ngram"
    num_tokens: int = 5
    ngram_min: int = 2
    ngram_max: int = 4
    max_batch: int = 4
    draft_model: object = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"speculative method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not 1 <= self.num_tokens <= 31:
            raise ValueError(f"num_speculative_tokens must be in [1, 31], got {self.num_tokens}")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError(f"need 1 <= ngram_min <= ngram_max, got {self.ngram_min} and {self.ngram_max}")
        if (self.method == "draft") != (self.draft_model is not None):
            raise ValueError("the draft method needs a draft model (--draft-model PATH), and only it takes one")

    def proposer(self, target_args, max_seqs: int, max_len: int | None) -> Proposer:
        if self.method == "ngram":
            return NgramProposer(self)
        return DraftProposer(self, target_args, max_seqs, max_len)


class Proposer:
    """Guesses for a step's decoding sequences: `propose(jobs)`, jobs [(cache row, context, room)] ->
    one list of at most `room` guesses per job."""

    def propose(self, jobs: list[tuple[int, list[int], int]]) -> list[list[int]]:
        raise NotImplementedError


class NgramProposer(Proposer):
    def __init__(self, config: SpeculativeConfig):
        self.config = config

    def propose(self, jobs):
        c = self.config
        return [propose_ngram(context, room, c.ngram_min, c.ngram_max) for _, context, room in jobs]


class DraftProposer(Proposer):
    """A smaller model's greedy continuation. Its cache row r follows the target's row r: at each
    proposal it is cut back to the longest prefix it shares with the context (what the target
    rejected goes; a new sequence in the row keeps a common prefix) and caught up with the rest, then
    fed its own guesses one step at a time, all sequences in one forward per step."""

    def __init__(self, config: SpeculativeConfig, target_args, max_seqs: int, max_len: int | None):
        from .runner import Runner

        draft = config.draft_model
        if draft.args.vocab_size != target_args.vocab_size:
            raise InputError(f"the draft model's vocabulary ({draft.args.vocab_size}) is not the target's "
                             f"({target_args.vocab_size}): it needs the same tokenizer")
        self.runner = Runner(draft)
        window = draft.args.sliding_window
        self.cache = self.runner.new_cache(max_seqs, None if window else (max_len or draft.args.max_seq_len))
        self.cache.rollback = config.num_tokens
        self.fed: list[list[int]] = [[] for _ in range(max_seqs)]  # what each draft row holds

    @torch.inference_mode()
    def propose(self, jobs):
        guesses: list[list[int]] = [[] for _ in jobs]
        active = [j for j, (_, _, room) in enumerate(jobs) if room > 0]
        for step in range(max((room for _, _, room in jobs), default=0)):
            active = [j for j in active if len(guesses[j]) < jobs[j][2]]
            if not active:
                break
            pieces = []
            for j in active:
                row, context = jobs[j][0], jobs[j][1] + guesses[j]
                self._catch_up(row, context)
                pieces.append(context[len(self.fed[row]):])
                self.fed[row] = list(context)
            seqlens = [len(p) for p in pieces]
            ends = torch.tensor(seqlens).cumsum(0) - 1
            logits = self.runner(torch.tensor(sum(pieces, []), device=self.cache.device), seqlens, self.cache,
                                 rows=[jobs[j][0] for j in active], output_rows=ends.to(self.cache.device))
            for j, token in zip(active, greedy(logits).tolist()):
                guesses[j].append(token)
        return guesses

    def _catch_up(self, row: int, context: list[int]) -> None:
        """Make the row hold a prefix of `context` (cut back what differs; reset when the window lost it)."""
        fed = self.fed[row]
        same = next((i for i, (a, b) in enumerate(zip(fed, context)) if a != b), min(len(fed), len(context)))
        same = min(same, len(context) - 1)  # at least one token to feed: its logits give the guess
        if same < len(fed):
            if not self.cache.truncate(row, same):
                self.cache.reset([row])
                same = 0
            self.fed[row] = fed[:same]


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
