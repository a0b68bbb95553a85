"""The plain batched generate loop of the library API (as the reference's `generate`)."""

from __future__ import annotations

import torch

from .errors import InputError
from .model import Transformer
from .sampling import check_sampling, sample


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
def generate(prompts: list[list[int]], model: Transformer, *, max_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, chunk_size: int | None = None, eos_id: int | None = None,
             seed: int | None = None, top_k: int = 0) -> tuple[list[list[int]], list[list[float]]]:
    """Continue each prompt by up to `max_tokens` tokens.

    Returns (tokens, logprobs): tokens[i] are the generated ids of prompt i, ending at its EOS if one
    came; logprobs[i] holds the log-probability of every token after the first, prompt and generated
    alike (so `max_tokens=0` scores a text). Prompts are pre-filled in chunks of `chunk_size` tokens
    (default: the sliding window, else the whole prompt).
    """
    check_prompts(prompts, model.args.vocab_size)
    check_sampling(temperature, top_p, top_k)
    if max_tokens < 0:
        raise InputError(f"max_tokens must be >= 0, got {max_tokens}")
    longest = max(len(p) for p in prompts)
    limit = context_limit(model)
    if limit is not None and longest + max_tokens > limit:
        raise InputError(f"prompt ({longest} tokens) + max_tokens ({max_tokens}) exceeds the model's context of {limit} tokens")
    chunk = chunk_size or model.args.sliding_window or longest
    if chunk <= 0:
        raise InputError(f"chunk_size must be positive, got {chunk_size}")

    device = model.device
    cache = model.new_cache(len(prompts), longest + max_tokens)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    logprobs: list[list[float]] = [[] for _ in prompts]
    last_logits: list[torch.Tensor] = [None] * len(prompts)  # type: ignore[list-item]

    # Pre-fill: every prompt that still has tokens advances by one chunk per forward.
    for offset in range(0, longest, chunk):
        rows = [i for i, p in enumerate(prompts) if len(p) > offset]
        pieces = [prompts[i][offset:offset + chunk] for i in rows]
        logits = model(torch.tensor(sum(pieces, []), device=device), [len(p) for p in pieces], cache, rows=rows)
        log_probs = torch.log_softmax(logits, dim=-1)
        start = 0
        for i, piece in zip(rows, pieces):
            # Logits at position t score the token at t+1, which may sit in the next chunk.
            targets = prompts[i][offset + 1:offset + len(piece) + 1]
            scored = log_probs[start:start + len(targets)].gather(1, torch.tensor(targets, device=device)[:, None])
            logprobs[i] += scored.squeeze(1).tolist()
            last_logits[i] = logits[start + len(piece) - 1]
            start += len(piece)

    tokens: list[list[int]] = [[] for _ in prompts]
    active = list(range(len(prompts)))
    logits = torch.stack(last_logits)  # [B_active, vocab]
    for step in range(max_tokens):
        next_ids = sample(logits, temperature=temperature, top_p=top_p, top_k=top_k, generator=generator)
        next_lp = torch.log_softmax(logits, dim=-1).gather(1, next_ids[:, None]).squeeze(1)
        for i, token, lp in zip(active, next_ids.tolist(), next_lp.tolist()):
            tokens[i].append(token)
            logprobs[i].append(lp)
        keep = [k for k, i in enumerate(active) if tokens[i][-1] != eos_id]  # indices into active
        if not keep or step == max_tokens - 1:
            break
        active = [active[k] for k in keep]
        logits = model(next_ids[keep], [1] * len(active), cache, rows=active)
    return tokens, logprobs
