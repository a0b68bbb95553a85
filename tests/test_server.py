"""The OpenAI-compatible server, started for real on 127.0.0.1 and used through the official client."""

from __future__ import annotations

import json
import threading
import time
import urllib.request

import openai
import pytest

import mistral7b
from _server import start_server, stop_server

API_KEY = "test-key"
MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def server():
    proc, url = start_server("--api-key", API_KEY, "--max-num-seqs", "32", "--max-model-len", "512", "--dtype", "fp32")
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def local():
    """The same model and tokenizer in this process, for reference answers."""
    return mistral7b.load(None), mistral7b.load_tokenizer(None)


def metrics(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(f"{url}/metrics").read().decode()
    return {line.split(" ")[0]: float(line.split(" ")[-1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def test_models_health_version(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert urllib.request.urlopen(f"{server}/health").status == 200
    assert json.loads(urllib.request.urlopen(f"{server}/version").read())["version"] == mistral7b.__version__


def test_completion_equals_library_greedy(client, local):
    model, tok = local
    prompt = "The three primary colors are"
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0)
    expected, _ = mistral7b.generate([tok.encode(prompt, bos=tok.add_bos)], model, max_tokens=20)
    assert out.choices[0].text == tok.decode(expected[0])
    assert out.usage.completion_tokens == 20 and out.choices[0].finish_reason == "length"


def test_completion_prompt_shapes(client, local):
    _, tok = local
    ids = tok.encode("Once upon a time", bos=tok.add_bos)
    by_ids = client.completions.create(model=MODEL, prompt=[ids, ids[:-1]], max_tokens=5, temperature=0)
    assert [c.index for c in by_ids.choices] == [0, 1]
    assert by_ids.usage.prompt_tokens == 2 * len(ids) - 1  # token ids are taken as given, no extra BOS
    by_text = client.completions.create(model=MODEL, prompt=["Once upon a time", "Hello"], max_tokens=5,
                                        temperature=0)
    assert by_text.choices[0].text == by_ids.choices[0].text
    single = client.completions.create(model=MODEL, prompt=ids, max_tokens=5, temperature=0)
    assert single.choices[0].text == by_ids.choices[0].text


def test_streaming_completion_matches_non_streaming(client):
    kwargs = dict(model=MODEL, prompt="def fibonacci(n):", max_tokens=24, temperature=0)
    whole = client.completions.create(**kwargs).choices[0].text
    chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24


def test_chat_streaming_and_not(client):
    messages = [{"role": "system", "content": "You are a concise assistant."},
                {"role": "user", "content": "What is the capital of France?"}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=40, temperature=0)
    answer = whole.choices[0].message.content
    assert "Paris" in answer and whole.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=40, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == answer
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_n_and_seed(client):
    kwargs = dict(model=MODEL, prompt="My favourite animal is", max_tokens=12, temperature=1.0, n=3)
    a = client.completions.create(**kwargs, seed=1234)
    b = client.completions.create(**kwargs, seed=1234)
    c = client.completions.create(**kwargs, seed=99)
    texts = [ch.text for ch in a.choices]
    assert len(texts) == 3 and texts == [ch.text for ch in b.choices]
    assert len(set(texts)) > 1  # the n samples differ
    assert texts != [ch.text for ch in c.choices]


def test_stop_strings(client):
    out = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=30, temperature=0, stop=[" 7"])
    assert out.choices[0].finish_reason == "stop"
    assert " 7" not in out.choices[0].text and out.choices[0].text.rstrip().endswith("6,")


def test_echo_logprobs_score_the_prompt(client, local):
    model, tok = local
    ids = tok.encode("The quick brown fox jumps over the lazy dog")
    out = client.completions.create(model=MODEL, prompt=ids, max_tokens=0, echo=True, logprobs=2, temperature=0)
    lp = out.choices[0].logprobs
    assert len(lp.token_logprobs) == len(ids) and lp.token_logprobs[0] is None
    _, expected = mistral7b.generate([ids], model, max_tokens=0)
    assert lp.token_logprobs[1:] == pytest.approx(expected[0], abs=1e-4)
    for token, top in zip(lp.tokens[1:], lp.top_logprobs[1:]):
        assert token in top  # the actual token is always among the top logprobs
    assert out.choices[0].text == tok.decode(ids)


def test_echo_lists_a_final_stop_token(client, local):
    """Scoring harnesses (lm-eval's local-completions) send max_tokens=1 and read the prompt's scores as
    token_logprobs[ctxlen:-1]: the generated token must be listed even when it is a stop token."""
    model, tok = local
    ids = tok.encode("The quick brown fox jumps over the lazy")
    (next_token,), _ = mistral7b.generate([ids], model, max_tokens=1)
    out = client.completions.create(model=MODEL, prompt=ids, max_tokens=1, echo=True, logprobs=1, temperature=0,
                                    extra_body={"stop_token_ids": next_token})
    assert out.choices[0].finish_reason == "stop"
    lp = out.choices[0].logprobs
    assert len(lp.token_logprobs) == len(ids) + 1 and lp.tokens[-1] == tok.decode(next_token)
    assert lp.token_logprobs[1:-1] == pytest.approx(mistral7b.generate([ids], model, max_tokens=0)[1][0], abs=1e-4)


def test_chat_logprobs(client):
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hi"}],
                                         max_tokens=5, temperature=0, logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert len(content) >= 1
    for item in content:
        assert len(item.top_logprobs) == 3
        assert item.top_logprobs[0].logprob >= item.logprob - 1e-6  # greedy picks the most likely


def test_a_conversation_resent_whole_reuses_its_cached_prefix(server, client, local):
    """A stateless client resends the conversation: the second request pre-fills only what is new
    (usage.prompt_tokens_details.cached_tokens, /metrics), and answers exactly as without the cache."""
    before = metrics(server)
    history = [{"role": "user", "content": "List ten animals that live in the sea, with one fact each. " * 4}]
    first = client.chat.completions.create(model=MODEL, messages=history, max_tokens=8, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    history += [{"role": "assistant", "content": first.choices[0].message.content},
                {"role": "user", "content": "And five birds?"}]
    second = client.chat.completions.create(model=MODEL, messages=history, max_tokens=8, temperature=0)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= 32 and cached % 32 == 0 and cached < second.usage.prompt_tokens  # whole blocks of the first
    after = metrics(server)
    assert after["mistral7b:prefix_cache_hits_total"] - before.get("mistral7b:prefix_cache_hits_total", 0) == cached
    assert after["mistral7b:prefix_cache_queries_total"] - before.get("mistral7b:prefix_cache_queries_total", 0) == (
        first.usage.prompt_tokens + second.usage.prompt_tokens)
    model, tok = local
    expected, _ = mistral7b.generate([tok.encode_chat(history)], model, max_tokens=8)
    assert second.choices[0].message.content == tok.decode([t for t in expected[0] if t not in tok.stop_ids])


def test_errors(server, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=5, temperature=-1)
    assert e.value.status_code == 400 and "temperature" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="hi " * 600, max_tokens=5)
    assert "512" in str(e.value) and "max_tokens" in str(e.value)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-5", prompt="hi", max_tokens=5)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[], max_tokens=5)
    # A malformed body: a 400 with the OpenAI error shape, not a 500.
    request = urllib.request.Request(f"{server}/v1/completions", data=b'{"prompt": 3}', method="POST",
                                     headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request)
    body = json.loads(e.value.read())
    assert e.value.code == 400 and set(body["error"]) == {"message", "type", "param", "code"}


def test_tokenize_detokenize_info(server, local):
    _, tok = local

    def post(path, payload):
        req = urllib.request.Request(f"{server}{path}", data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"})
        return json.loads(urllib.request.urlopen(req).read())

    ids = post("/tokenize", {"prompt": "Hello world"})["tokens"]
    assert ids == tok.encode("Hello world", bos=tok.add_bos)
    assert post("/detokenize", {"tokens": ids})["prompt"] == "Hello world"
    chat = post("/tokenize", {"messages": [{"role": "user", "content": "hi"}]})
    assert chat["tokens"] == tok.encode_chat([{"role": "user", "content": "hi"}])
    info = json.loads(urllib.request.urlopen(f"{server}/tokenizer_info").read())
    assert info["vocab_size"] == tok.vocab_size and info["eos_token_id"] == tok.eos_id


def test_32_concurrent_streams_equal_solo_greedy(server, client):
    prompts = [f"Write one sentence about the number {i}." for i in range(32)]

    def ask(prompt, stream):
        kwargs = dict(model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=16, temperature=0)
        if not stream:
            return client.chat.completions.create(**kwargs).choices[0].message.content
        return "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**kwargs, stream=True)
                       if c.choices)

    solo = {p: ask(p, False) for p in prompts[:4]}  # alone, one after another
    results: dict[str, str] = {}
    threads = [threading.Thread(target=lambda p=p: results.__setitem__(p, ask(p, True))) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 32 and all(results.values())
    for p, text in solo.items():
        assert results[p] == text  # batch invariance: the same greedy answer among 31 others
    after = metrics(server)
    assert after["mistral7b:num_requests_running"] == 0
    assert after["mistral7b:generation_tokens_total"] > 0
    assert after["mistral7b:time_to_first_token_seconds_count"] >= 32


def test_disconnect_frees_the_slot(server, client):
    stream = client.completions.create(model=MODEL, prompt="Count: 1, 2, 3,", max_tokens=400, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 3:
            break
    running = metrics(server)["mistral7b:num_requests_running"]
    stream.close()  # the client goes away mid-stream
    deadline = time.time() + 30
    while time.time() < deadline and metrics(server)["mistral7b:kv_cache_usage_perc"] > 0:
        time.sleep(0.2)
    assert running == 1
    assert metrics(server)["mistral7b:kv_cache_usage_perc"] == 0
    assert metrics(server)["mistral7b:num_requests_running"] == 0


def test_overload_gives_503():
    proc, url = start_server("--max-num-seqs", "1", "--max-queue", "1", "--max-model-len", "512")
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
        def start():
            return client.completions.create(model=MODEL, prompt="Count:", max_tokens=300, stream=True,
                                             extra_body={"ignore_eos": True})

        busy = [start()]
        next(iter(busy[0]))  # running: it holds the only cache row
        busy.append(start())  # waiting: the queue is at its bound
        with pytest.raises(openai.InternalServerError) as e:
            client.completions.create(model=MODEL, prompt="hi", max_tokens=2)
        assert e.value.status_code == 503
        for s in busy:
            s.close()
    finally:
        stop_server(proc)
