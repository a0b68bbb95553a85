"""The library's batched `generate` (as the reference's), a synchronous use of the engine's step."""

from __future__ import annotations

from .engine import Engine, Request
from .engine.engine import check_prompts, default_chunk_size
from .model import Transformer
from .sampling import SamplingParams


def generate(prompts: list[list[int]], model: Transformer, *, max_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, chunk_size: int | None = None, eos_id: int | None = None,
             seed: int | None = None, top_k: int = 0) -> tuple[list[list[int]], list[list[float]]]:
    """Continue each prompt by up to `max_tokens` tokens.

    Returns (tokens, logprobs): tokens[i] are the generated ids of prompt i, ending at its EOS if one
    came; logprobs[i] holds the log-probability of every token after the first, prompt and generated
    alike (so `max_tokens=0` scores a text). Prompts are pre-filled in chunks of `chunk_size` tokens
    (default: the sliding window, else the whole prompt), all prompts advancing together.
    """
    check_prompts(prompts, model.args.vocab_size)
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                            stop_token_ids=() if eos_id is None else (eos_id,), logprobs=0, prompt_logprobs=0)
    longest = max(len(p) for p in prompts)
    chunk = chunk_size or default_chunk_size(model.args, longest)
    engine = Engine(model, max_num_seqs=len(prompts), max_model_len=longest + max_tokens,
                    max_tokens_per_step=len(prompts) * chunk, chunk_size=chunk)
    requests = [engine.add_request(Request(list(p), params)) for p in prompts]
    index = {r.request_id: i for i, r in enumerate(requests)}
    tokens: list[list[int]] = [[] for _ in prompts]
    logprobs: list[list[float]] = [[] for _ in prompts]
    while engine.has_work:
        for out in engine.step():
            i = index[out.request_id]
            if out.prompt_logprobs is not None:
                logprobs[i] += [entry.logprob for entry in out.prompt_logprobs[1:]]
            tokens[i] += out.new_tokens
            logprobs[i] += [entry.logprob for entry in out.new_logprobs]
    return tokens, logprobs
