"""The decode loop: `stream_tokens` yields tokens step by step (for streaming and chat), and the
library's batched `generate` (as the reference's) is a plain use of it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import torch

from .cache import KVCache
from .errors import InputError
from .model import Transformer
from .sampling import check_sampling, sample


@dataclass
class TokenEvent:
    index: int  # which prompt of the batch
    token: int
    logprob: float  # log-probability under the model (before temperature/top-p)
    finished: bool  # a stop id or the max_tokens-th token


def check_prompts(prompts: list[list[int]], vocab_size: int) -> None:
    if not prompts:
        raise InputError("no prompts given")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise InputError(f"prompt {i} is empty")
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise InputError(f"prompt {i} has token id(s) {bad[:5]} outside the vocabulary [0, {vocab_size})")


def context_limit(model: Transformer) -> int | None:
    """Longest sequence the model can run: unbounded for windowed models (the cache rolls)."""
    return None if model.args.sliding_window is not None else model.args.max_seq_len


@torch.inference_mode()
def stream_tokens(prompts: list[list[int]], model: Transformer, *, max_tokens: int, temperature: float = 0.0,
                  top_p: float = 1.0, top_k: int = 0, chunk_size: int | None = None,
                  stop_ids: Iterable[int] = (), seed: int | None = None, cache: KVCache | None = None,
                  rows: list[int] | None = None, prompt_logprobs: list[list[float]] | None = None,
                  ) -> Iterator[list[TokenEvent]]:
    """Pre-fill the prompts in chunks, then yield each decode step's new tokens.

    With `cache`/`rows`, the prompts continue the sequences already held in those cache rows (a chat
    turn); otherwise a fresh cache is made. When `prompt_logprobs` is given it receives, per prompt,
    the log-probabilities of its tokens after the first. A sequence stops at a token in `stop_ids`
    (which is yielded) or after `max_tokens` tokens.
    """
    check_prompts(prompts, model.args.vocab_size)
    check_sampling(temperature, top_p, top_k)
    if max_tokens < 0:
        raise InputError(f"max_tokens must be >= 0, got {max_tokens}")
    if chunk_size is not None and chunk_size <= 0:
        raise InputError(f"chunk_size must be positive, got {chunk_size}")
    rows = list(range(len(prompts))) if rows is None else rows
    starts = [cache.lengths[r] for r in rows] if cache is not None else [0] * len(prompts)
    needed = max(s + len(p) for s, p in zip(starts, prompts)) + max_tokens
    limit = context_limit(model)
    if limit is not None and needed > limit:
        raise InputError(f"prompt ({needed - max_tokens} tokens) + max_tokens ({max_tokens}) exceeds "
                         f"the model's context of {limit} tokens")
    if cache is None:
        cache = model.new_cache(len(prompts), needed)
    longest = max(len(p) for p in prompts)
    chunk = chunk_size or model.args.sliding_window or longest
    device = model.device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    last_logits: list[torch.Tensor] = [None] * len(prompts)  # type: ignore[list-item]

    # Pre-fill: every prompt that still has tokens advances by one chunk per forward.
    for offset in range(0, longest, chunk):
        active = [i for i, p in enumerate(prompts) if len(p) > offset]
        pieces = [prompts[i][offset:offset + chunk] for i in active]
        logits = model(torch.tensor(sum(pieces, []), device=device), [len(p) for p in pieces], cache,
                       rows=[rows[i] for i in active])
        start = 0
        for i, piece in zip(active, pieces):
            if prompt_logprobs is not None:
                # Logits at position t score the token at t+1, which may sit in the next chunk.
                targets = torch.tensor(prompts[i][offset + 1:offset + len(piece) + 1], device=device)
                scores = torch.log_softmax(logits[start:start + len(targets)], dim=-1)
                prompt_logprobs[i] += scores.gather(1, targets[:, None]).squeeze(1).tolist()
            last_logits[i] = logits[start + len(piece) - 1]
            start += len(piece)

    stops = set(stop_ids)
    active = list(range(len(prompts)))
    logits = torch.stack(last_logits)  # [B_active, vocab]
    for step in range(max_tokens):
        next_ids = sample(logits, temperature=temperature, top_p=top_p, top_k=top_k, generator=generator)
        next_lp = torch.log_softmax(logits, dim=-1).gather(1, next_ids[:, None]).squeeze(1)
        last = step == max_tokens - 1
        events = [TokenEvent(i, t, lp, last or t in stops)
                  for i, t, lp in zip(active, next_ids.tolist(), next_lp.tolist())]
        yield events
        keep = [k for k, e in enumerate(events) if not e.finished]  # indices into `active`
        if not keep:
            return
        active = [active[k] for k in keep]
        logits = model(next_ids[keep], [1] * len(active), cache, rows=[rows[i] for i in active])


def generate(prompts: list[list[int]], model: Transformer, *, max_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, chunk_size: int | None = None, eos_id: int | None = None,
             seed: int | None = None, top_k: int = 0) -> tuple[list[list[int]], list[list[float]]]:
    """Continue each prompt by up to `max_tokens` tokens.

    Returns (tokens, logprobs): tokens[i] are the generated ids of prompt i, ending at its EOS if one
    came; logprobs[i] holds the log-probability of every token after the first, prompt and generated
    alike (so `max_tokens=0` scores a text). Prompts are pre-filled in chunks of `chunk_size` tokens
    (default: the sliding window, else the whole prompt).
    """
    tokens: list[list[int]] = [[] for _ in prompts]
    logprobs: list[list[float]] = [[] for _ in prompts]
    for events in stream_tokens(prompts, model, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                top_k=top_k, chunk_size=chunk_size, seed=seed, prompt_logprobs=logprobs,
                                stop_ids=() if eos_id is None else (eos_id,)):
        for e in events:
            tokens[e.index].append(e.token)
            logprobs[e.index].append(e.logprob)
    return tokens, logprobs
