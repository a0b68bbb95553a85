"""Serving throughput under concurrency: the same workload with 1, 4, 16 and 32 concurrent clients
against `mistral7b serve`, and, in the same run, through transformers' `generate` one request at a
time on the same weights.

    python benchmarks/serve_concurrency.py [--requests 32] [--max-tokens 16] [--json out.json]
    python benchmarks/serve_concurrency.py --server-args "--quantize int4"   # the fast path
    python benchmarks/serve_concurrency.py --llama-server PATH/llama-server   # and llama.cpp's server, same clients

Prints a table (generated tokens/s, p50/p99 time to first token) and the ratio of 16-client to
1-client throughput. Greedy decoding with ignore_eos, so every request generates exactly
--max-tokens tokens and the work is the same in every row.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _server import free_port, start_process, start_server, stop_server  # noqa: E402

import mistral7b  # noqa: E402
from mistral7b.defaults import DEFAULT_MODEL_NAME, default_model_path  # noqa: E402

TOPICS = ["the sea", "a mountain", "coffee", "the moon", "a library", "rain", "bicycles", "music"]


def workload(n: int) -> list[list[dict]]:
    return [[{"role": "user", "content": f"Write a short paragraph about {TOPICS[i % len(TOPICS)]} (#{i})."}]
            for i in range(n)]


def one_request(client: openai.OpenAI, messages: list[dict], max_tokens: int) -> tuple[float, int]:
    """-> (time to first token, tokens generated), streaming."""
    start = time.perf_counter()
    first = None
    tokens = 0
    stream = client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=messages, max_tokens=max_tokens,
                                            temperature=0, stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True})
    pieces = 0
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces += 1
            if first is None:
                first = time.perf_counter() - start
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return first or 0.0, tokens or pieces


def run_concurrency(client, requests, max_tokens: int, clients: int) -> dict:
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda m: one_request(client, m, max_tokens), requests))
    wall = time.perf_counter() - start
    ttfts = sorted(r[0] for r in results)
    tokens = sum(r[1] for r in results)
    return {"clients": clients, "requests": len(requests), "tokens": tokens, "seconds": wall,
            "tokens_per_s": tokens / wall, "ttft_p50": statistics.median(ttfts),
            "ttft_p99": ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))]}


def start_llama_server(binary: str, parallel: int) -> tuple[subprocess.Popen, str]:
    """llama.cpp's own server on the same GGUF file, `parallel` slots of 512 tokens, 2 threads."""
    port = free_port()
    return start_process([binary, "-m", str(default_model_path()), "--host", "127.0.0.1", "--port", str(port),
                          "--parallel", str(parallel), "-c", str(512 * parallel), "-t", "2", "--log-disable"], port)


def run_transformers(requests, max_tokens: int) -> dict:
    """The same chats through transformers, one request at a time (its usual way to run)."""
    import torch
    from transformers import AutoModelForCausalLM

    # The same weights as the server's, exported as a Hugging Face folder for transformers to load.
    folder = Path(tempfile.mkdtemp(prefix="smollm2-hf-"))
    mistral7b.save(mistral7b.load(None), folder, format="hf")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = mistral7b.load_tokenizer(None)
    start = time.perf_counter()
    tokens = 0
    ttfts = []
    with torch.no_grad():
        for messages in requests:
            ids = torch.tensor([tok.encode_chat(messages)])
            t0 = time.perf_counter()
            model(ids)  # time to first token = the prefill
            ttfts.append(time.perf_counter() - t0)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                 min_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
            tokens += out.shape[1] - ids.shape[1]
    wall = time.perf_counter() - start - sum(ttfts)  # the extra prefills above are not part of the work
    return {"clients": "transformers (1 at a time)", "requests": len(requests), "tokens": tokens, "seconds": wall,
            "tokens_per_s": tokens / wall, "ttft_p50": statistics.median(ttfts),
            "ttft_p99": sorted(ttfts)[min(len(ttfts) - 1, int(0.99 * len(ttfts)))]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=32, help="requests per concurrency level (default: 32)")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens generated per request (default: 16)")
    parser.add_argument("--levels", default="1,4,16,32", help="client counts to run (default: 1,4,16,32)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--server-args", default="", help="extra `mistral7b serve` flags, e.g. '--quantize int4'")
    parser.add_argument("--no-peer", action="store_true", help="skip the transformers run")
    parser.add_argument("--llama-server", metavar="PATH", help="also run the levels against llama.cpp's server "
                        "(built from the llama-cpp-python sdist's vendor/llama.cpp: cmake --build build --target "
                        "llama-server), --parallel 32 on the same GGUF")
    args = parser.parse_args()

    requests = workload(args.requests)
    proc, url = start_server("--max-num-seqs", "32", "--max-model-len", "512", *args.server_args.split())
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
        one_request(client, requests[0], 2)  # warm-up
        rows = [run_concurrency(client, requests, args.max_tokens, int(c)) for c in args.levels.split(",")]
    finally:
        stop_server(proc)
    if args.llama_server:
        proc, url = start_llama_server(args.llama_server, 32)
        try:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
            one_request(client, requests[0], 2)
            rows += [{**run_concurrency(client, requests, args.max_tokens, int(c)), "clients": f"llama-server {c}"}
                     for c in args.levels.split(",")]
        finally:
            stop_server(proc)
    if not args.no_peer:
        rows.append(run_transformers(requests, args.max_tokens))

    print(f"{'clients':>28} {'tokens/s':>9} {'ttft p50':>9} {'ttft p99':>9} {'seconds':>8}")
    for r in rows:
        print(f"{r['clients']!s:>28} {r['tokens_per_s']:9.1f} {r['ttft_p50']:9.3f} {r['ttft_p99']:9.3f} {r['seconds']:8.1f}")
    by = {r["clients"]: r for r in rows}
    summary = {}
    if 1 in by and 16 in by:
        summary["ratio_16_to_1"] = by[16]["tokens_per_s"] / by[1]["tokens_per_s"]
        print(f"16 clients / 1 client throughput: {summary['ratio_16_to_1']:.2f}x")
    if 16 in by and "llama-server 16" in by:
        summary["ratio_16_to_llama_server_16"] = by[16]["tokens_per_s"] / by["llama-server 16"]["tokens_per_s"]
        print(f"16 clients: mistral7b / llama-server: {summary['ratio_16_to_llama_server_16']:.2f}x")
    if 16 in by and not args.no_peer:
        summary["ratio_16_to_transformers"] = by[16]["tokens_per_s"] / rows[-1]["tokens_per_s"]
        print(f"16 clients / transformers one at a time: {summary['ratio_16_to_transformers']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, **summary}, indent=2))


if __name__ == "__main__":
    main()
