"""A multi-turn chat replayed through the HTTP API, as a stateless client sends it (the whole
conversation every turn), against `mistral7b serve` with and without prefix caching.

    python benchmarks/prefix_chat.py [--turns 10] [--words 110] [--server-args "--quantize int4"]

Each turn adds a user message of about --words words and the model's answer (--max-tokens, greedy)
to the history, so the last turn's prompt is ~1.5k tokens with the defaults. Prints per turn the
prompt tokens, the tokens the server took from its prefix cache (usage.prompt_tokens_details) and
the time to the first streamed token, for both servers, then the last turn's TTFT ratio.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import openai

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _server import start_server, stop_server  # noqa: E402

from mistral7b.defaults import DEFAULT_MODEL_NAME  # noqa: E402

WORDS = ("river stone lantern harbor meadow copper violet thunder orchard glacier canyon ember willow "
         "falcon marble prairie quartz saffron tundra beacon").split()


def user_message(turn: int, words: int) -> str:
    body = " ".join(WORDS[(turn * 7 + i * 3) % len(WORDS)] for i in range(words))
    return f"Turn {turn}. Here are my notes: {body}. Summarise them in one sentence."


def replay(url: str, turns: int, words: int, max_tokens: int) -> list[tuple[int, int, float]]:
    """-> per turn (prompt tokens, cached tokens, seconds to the first token)."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
    messages, rows = [], []
    for turn in range(turns):
        messages.append({"role": "user", "content": user_message(turn, words)})
        start, first, answer, usage = time.perf_counter(), None, "", None
        for chunk in client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=messages, max_tokens=max_tokens,
                                                    temperature=0, stream=True,
                                                    stream_options={"include_usage": True}):
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.perf_counter()
                answer += chunk.choices[0].delta.content
            usage = chunk.usage or usage
        messages.append({"role": "assistant", "content": answer})
        cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
        rows.append((usage.prompt_tokens, cached, (first or time.perf_counter()) - start))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--turns", type=int, default=10)
    p.add_argument("--words", type=int, default=110, help="words per user message")
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--server-args", default="", help="extra `mistral7b serve` flags, e.g. '--quantize int4'")
    args = p.parse_args()

    results = {}
    for name, flags in (("prefix caching", []), ("no prefix caching", ["--no-prefix-caching"])):
        proc, url = start_server(*args.server_args.split(), *flags)
        try:
            results[name] = replay(url, args.turns, args.words, args.max_tokens)
        finally:
            stop_server(proc)
    print(f"serve {args.server_args or '(defaults)'}: {args.turns} turns, TTFT per turn")
    print("| turn | prompt tokens | cached (on) | TTFT on (s) | TTFT off (s) | off / on |")
    print("| --- | --- | --- | --- | --- | --- |")
    for turn, (on, off) in enumerate(zip(results["prefix caching"], results["no prefix caching"]), 1):
        print(f"| {turn} | {on[0]} | {on[1]} | {on[2]:.3f} | {off[2]:.3f} | {off[2] / on[2]:.2f}x |")
    last_on, last_off = results["prefix caching"][-1][2], results["no prefix caching"][-1][2]
    print(f"last turn: {last_off / last_on:.1f}x faster to the first token with prefix caching")


if __name__ == "__main__":
    main()
