"""Greedy tokens of N requests run together through one engine vs each run alone (issue 20, bug 11).

    python benchmarks/batch_invariance.py [int4|fp32|bf16] [N] [max_tokens] [--scores]

Prints how many of the N outputs differ from the request run alone, and where the first differs.
--scores: the prompts' log-probabilities instead (echo + logprobs, lm-eval's log-likelihoods): how
many prompts have any that differ, and the largest difference of a prompt's summed log-probability.
"""

from __future__ import annotations

import sys
import time

import torch

import mistral7b
from mistral7b.engine import Engine, Request
from mistral7b.sampling import SamplingParams

TOPICS = ["the ocean", "a small robot", "the history of bread", "why the sky is blue", "a lighthouse keeper",
          "prime numbers", "the French revolution", "how to tie a knot", "volcanoes", "a cat named Miso",
          "the moon landing", "jazz music", "photosynthesis", "a haunted library", "the stock market",
          "winter in Finland"]


def prompts(tokenizer, n: int) -> list[list[int]]:
    """n prompts of varied lengths (a few to ~150 tokens)."""
    out = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        text = f"Write a short story about {topic}." if i % 3 == 0 else (
            f"Question {i}: explain {topic} to a child, in simple words. " * (1 + i % 6))
        out.append(tokenizer.encode_chat([{"role": "user", "content": text}]))
    return out


def run(model, requests: list[list[int]], max_tokens: int, **engine_args) -> list[list[int]]:
    engine = Engine(model, max_num_seqs=32, max_model_len=1024, **engine_args)
    reqs = [engine.add_request(Request(p, SamplingParams(max_tokens=max_tokens, ignore_eos=True))) for p in requests]
    tokens = {r.request_id: [] for r in reqs}
    while engine.has_work:
        for out in engine.step():
            tokens[out.request_id] += out.new_tokens
    return [tokens[r.request_id] for r in reqs]


def compare(model, tokenizer, n: int, max_tokens: int) -> int:
    ps = prompts(tokenizer, n)
    start = time.perf_counter()
    together = run(model, ps, max_tokens)
    t_together = time.perf_counter() - start
    start = time.perf_counter()
    alone = [run(model, [p], max_tokens)[0] for p in ps]
    t_alone = time.perf_counter() - start
    differ = [i for i in range(n) if together[i] != alone[i]]
    firsts = [next(j for j, (a, b) in enumerate(zip(together[i], alone[i])) if a != b) for i in differ]
    print(f"{n} requests, prompts {min(map(len, ps))}-{max(map(len, ps))} tokens, {max_tokens} tokens each: "
          f"{len(differ)} of {n} differ from the same request alone (first differing token: {firsts}); "
          f"together {t_together:.1f} s, alone {t_alone:.1f} s", flush=True)
    return len(differ)


def scores(model, requests: list[list[int]]) -> list[list[float]]:
    engine = Engine(model, max_num_seqs=32, max_model_len=1024)
    reqs = [engine.add_request(Request(p, SamplingParams(max_tokens=1, prompt_logprobs=0))) for p in requests]
    out = {}
    while engine.has_work:
        for o in engine.step():
            if o.prompt_logprobs is not None:
                out[o.request_id] = [e.logprob for e in o.prompt_logprobs[1:]]
    return [out[r.request_id] for r in reqs]


def compare_scores(model, tokenizer, n: int) -> int:
    ps = prompts(tokenizer, n)
    together = scores(model, ps)
    alone = [scores(model, [p])[0] for p in ps]
    differ = [i for i in range(n) if together[i] != alone[i]]
    worst = max(abs(sum(together[i]) - sum(alone[i])) for i in range(n))
    print(f"{n} prompts scored together vs alone: {len(differ)} of {n} differ; largest difference of a "
          f"prompt's summed log-probability {worst:.4g}", flush=True)
    return len(differ)


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    mode = args[0] if args else "int4"
    n = int(args[1]) if len(args) > 1 else 32
    max_tokens = int(args[2]) if len(args) > 2 else 32
    model = mistral7b.load(None, quantize="int4") if mode == "int4" else mistral7b.load(None, dtype=mode)
    tokenizer = mistral7b.load_tokenizer(None)
    print(f"{mode}, {torch.get_num_threads()} threads")
    if "--scores" in sys.argv:
        compare_scores(model.eval(), tokenizer, n)
    else:
        compare(model.eval(), tokenizer, n, max_tokens)


if __name__ == "__main__":
    main()
