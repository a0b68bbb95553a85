"""The server's contract under real clients (issue 20): cancellation, validation, error shapes,
overload, shutdown. A real `mistral7b serve` on 127.0.0.1, the official `openai` client and httpx."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import httpx2 as httpx
import openai
import pytest

from _server import free_port, start_server, stop_server

API_KEY = "contract-key"
MODEL = "SmolLM2-135M-Instruct"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def server():
    proc, url = start_server("--api-key", API_KEY, "--max-num-seqs", "4", "--max-model-len", "512", "--dtype", "fp32")
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0, timeout=300)


def gauges(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics").text
    return {line.split(" ")[0]: float(line.split(" ")[-1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def wait_for(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def test_non_streaming_disconnect_frees_the_row_within_a_second(server):
    """Under --api-key (auth as a dependency, not an HTTP middleware that hides the disconnect)."""
    gone_at: list[float] = []

    def abandon():
        body = {"model": MODEL, "prompt": "Count: 1, 2,", "max_tokens": 480, "ignore_eos": True}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{server}/v1/completions", json=body, headers=AUTH, timeout=6)
        gone_at.append(time.monotonic())

    caller = threading.Thread(target=abandon)
    caller.start()
    assert wait_for(lambda: gauges(server)["mistral7b:num_requests_running"] == 1, 6)
    caller.join()
    assert gone_at, "the request finished before its client gave up"
    assert wait_for(lambda: gauges(server)["mistral7b:kv_cache_usage_perc"] == 0, 1.0)
    assert gauges(server)["mistral7b:num_requests_running"] == 0


def post(url: str, path: str, body: dict, **kwargs) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, headers=AUTH, timeout=120, **kwargs)


def assert_error(response: httpx.Response, status: int, param: str | None = None) -> str:
    """The OpenAI error shape with this status (and param); -> its message."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == status
    if param is not None:
        assert error["param"] == param, error
    return error["message"]


def completion(url: str, **fields) -> httpx.Response:
    return post(url, "/v1/completions", {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 4,
                                         "temperature": 0, **fields})


def test_logit_bias_is_applied(server, client):
    plain = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0)
    forced = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0,
                                       logit_bias={"42": 100})
    assert forced.choices[0].text == post(server, "/detokenize", {"tokens": [42] * 4}).json()["prompt"]
    first = post(server, "/tokenize", {"prompt": plain.choices[0].text, "add_special_tokens": False}).json()["tokens"]
    banned = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0,
                                       logit_bias={str(t): -100 for t in first})
    assert banned.choices[0].text != plain.choices[0].text


@pytest.mark.parametrize("bias", [{"x": 1}, {"49152": 1}, {"-1": 1}, {"42": 101}, {"42": -100.5}])
def test_bad_logit_bias_is_400(server, bias):
    assert_error(completion(server, logit_bias=bias), 400, "logit_bias")


@pytest.mark.parametrize("seed", [-2**63 - 1, 2**63, 2**64])
def test_seed_outside_64_bits_is_400(server, seed):
    assert_error(completion(server, seed=seed, temperature=1), 400, "seed")


@pytest.mark.parametrize("ids", [[49153], [-1]])
def test_stop_token_ids_outside_the_vocabulary_are_400(server, ids):
    assert_error(completion(server, stop_token_ids=ids), 400, "stop_token_ids")


def test_stream_options_without_stream_is_400(server):
    assert_error(completion(server, stream_options={"include_usage": True}), 400, "stream_options")


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_over_long_prompt_without_max_tokens_names_the_context(server, route):
    body = {"model": MODEL, "prompt": "hi " * 600} if route == "/v1/completions" else \
        {"model": MODEL, "messages": [{"role": "user", "content": "hi " * 600}]}
    message = assert_error(post(server, route, {**body, "max_tokens": None}), 400)
    assert "maximum context length is 512" in message


def test_max_model_len_beyond_the_context_refuses_to_start():
    done = subprocess.run([sys.executable, "-m", "mistral7b", "serve", "--port", str(free_port()), "--dtype", "fp32",
                           "--max-model-len", "10100"], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and done.stdout == ""
    assert done.stderr.splitlines() == [
        "error: --max-model-len 10100 is more than this model's context (8192 tokens); give at most 8192 or leave it out"]
