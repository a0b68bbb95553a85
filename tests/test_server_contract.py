"""The server's contract under real clients (issue 20): cancellation, validation, error shapes,
overload, shutdown. A real `mistral7b serve` on 127.0.0.1, the official `openai` client and httpx."""

from __future__ import annotations

import threading
import time

import httpx2 as httpx
import openai
import pytest

from _server import start_server, stop_server

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
