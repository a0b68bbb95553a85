"""A sequence's tokens and log-probabilities do not depend on which other sequences share its steps
(issue 20): greedy outputs and prompt log-probabilities of requests run together equal, exactly, those
of each request run alone; in the engine, and through the real server with the official client."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch

import mistral7b
from _server import start_server, stop_server
from conftest import make_tiny_model
from mistral7b.engine import Engine, Request
from mistral7b.quant import quantize
from mistral7b.sampling import SamplingParams

MODEL = "SmolLM2-135M-Instruct"


def chat_prompts(tok, n: int) -> list[list[int]]:
    """n chat prompts of 10 to ~330 tokens: short ones, ones the runner cuts into native chunks, ones
    longer than a step's token budget."""
    topics = ["the sea", "a robot", "bread", "the sky", "a lighthouse", "primes", "jazz", "volcanoes"]
    return [tok.encode_chat([{"role": "user", "content": f"Tell me about {topics[i % 8]}. " * (1 + (i * 7) % 40)}])
            for i in range(n)]


def run(model, prompts: list[list[int]], params: SamplingParams, **engine_args) -> list[tuple[list[int], list[float]]]:
    """(generated tokens, prompt log-probabilities) of each prompt, all queued at once on one engine."""
    engine = Engine(model, max_num_seqs=32, max_model_len=1024, **engine_args)
    requests = [engine.add_request(Request(p, params)) for p in prompts]
    tokens = {r.request_id: [] for r in requests}
    scores = {r.request_id: [] for r in requests}
    while engine.has_work:
        for out in engine.step():
            tokens[out.request_id] += out.new_tokens
            if out.prompt_logprobs is not None:
                scores[out.request_id] = [e.logprob for e in out.prompt_logprobs[1:]]
    return [(tokens[r.request_id], scores[r.request_id]) for r in requests]


def assert_batch_invariant(model, prompts, params, **engine_args) -> None:
    together = run(model, prompts, params, **engine_args)
    alone = [run(model, [p], params, **engine_args)[0] for p in prompts]
    differ = [i for i, (a, b) in enumerate(zip(together, alone)) if a != b]
    assert not differ, f"{len(differ)} of {len(prompts)} requests differ from the same request alone: {differ}"


@pytest.mark.parametrize("mode", [None, "int8", "int4"])
def test_tiny_windowed_model_is_batch_invariant(mode):
    """32 requests (prompts past the window W = 4, chunks of 3 within a 40-token step budget) against
    each alone: greedy tokens and prompt log-probabilities equal."""
    model = make_tiny_model()
    model = quantize(model, mode) if mode else model
    prompts = [torch.randint(0, 128, (2 + i % 13,), generator=torch.Generator().manual_seed(i)).tolist()
               for i in range(32)]
    params = SamplingParams(max_tokens=12, prompt_logprobs=0, ignore_eos=True)
    assert_batch_invariant(model, prompts, params, max_tokens_per_step=40, chunk_size=3)


# fp32 takes a minute more and already batched natively through the same GEMV rows: a slow test.
@pytest.fixture(scope="module", params=["int4", pytest.param("fp32", marks=pytest.mark.slow)])
def default_model(request, smollm2_path):
    """The default model as `serve` runs it (int4: the GGUF's Q4_1 blocks) and dequantized to fp32."""
    quantized = request.param == "int4"
    return mistral7b.load(None, quantize="int4" if quantized else None).eval(), mistral7b.load_tokenizer(None)


def test_default_model_greedy_tokens_are_batch_invariant(default_model):
    model, tok = default_model
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    assert_batch_invariant(model, chat_prompts(tok, 12), params)


def test_default_model_prompt_logprobs_are_batch_invariant(default_model):
    """What scoring (eval, lm-eval through the server) reads: every prompt token's log-probability."""
    model, tok = default_model
    params = SamplingParams(max_tokens=1, prompt_logprobs=0)
    assert_batch_invariant(model, chat_prompts(tok, 10), params)


@pytest.mark.slow  # ~100 s; tests/test_server.py checks 32 concurrent streams against solo answers by default
def test_server_answers_equal_the_library_alone_under_concurrency(smollm2_path):
    """The default server (int4), 32 concurrent clients through the official client, streaming and
    not: each greedy completion equals the library's for that prompt alone, and each echoed prompt's
    token_logprobs (max_tokens=1, as lm-eval's local-completions asks) equal the library's scores."""
    model, tok = mistral7b.load(None, quantize="int4").eval(), mistral7b.load_tokenizer(None)
    prompts = chat_prompts(tok, 32)
    proc, url = start_server("--max-num-seqs", "32", "--max-model-len", "1024")
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)

        def complete(i: int) -> list[int]:
            kw = dict(model=MODEL, prompt=prompts[i], max_tokens=16, temperature=0, logprobs=0)
            if i % 2:
                chunks = client.completions.create(**kw, stream=True)
                return [t for c in chunks for ch in c.choices if ch.logprobs for t in ch.logprobs.tokens]
            return client.completions.create(**kw).choices[0].logprobs.tokens

        def score(i: int) -> list[float]:
            out = client.completions.create(model=MODEL, prompt=prompts[i], max_tokens=1, temperature=0, logprobs=1,
                                            echo=True)
            return out.choices[0].logprobs.token_logprobs

        with ThreadPoolExecutor(32) as pool:
            texts = list(pool.map(complete, range(32)))
            scored = list(pool.map(score, range(32)))
    finally:
        stop_server(proc)
    mistakes = []
    for i, p in enumerate(prompts):
        [(tokens, _)] = run(model, [p], SamplingParams(max_tokens=16, stop_token_ids=tuple(tok.stop_ids)))
        [(next_token, lps)] = run(model, [p], SamplingParams(max_tokens=1, prompt_logprobs=0))
        expected_text = [tok.decode([t]) for t in tokens if t not in tok.stop_ids]
        # With echo every token is listed, the prompt's (the first unscored), then the generated one.
        if texts[i] != expected_text or scored[i][1:len(p)] != lps or len(scored[i]) != len(p) + 1:
            mistakes.append(i)
    assert not mistakes, f"{len(mistakes)} of 32 answers differ from the library's alone: {mistakes}"
