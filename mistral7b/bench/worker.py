"""One measurement in its own process, so its peak memory is its own:

    python -m mistral7b.bench.worker SPEC.json RESULT.json

SPEC["kind"] picks it: "ours", "transformers", "llama.cpp" (the same workload through each) or "export"
(write a Hugging Face copy of the checkpoint for transformers). RESULT
gets the numbers, or {"skipped": reason} when the engine cannot run here; either way plus "peak_rss_mib".

Every engine runs the same greedy workload: warm-up, then `repeat` timed passes; each pass feeds
prompts[0] and decodes `decode_tokens` more tokens after the first (batch 1), then feeds all the
prompts together and decodes as many tokens each (batch N). The first token's time is the prefill;
the decode rate counts only the tokens after it. Medians over the passes are reported.
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

# A pass: (prompts, tokens to decode after the first) -> (seconds to every first token, decode seconds).
Pass = Callable[[list[list[int]], int], tuple[float, float]]


class Skipped(Exception):
    """This engine cannot run here (not installed, cannot read the file): a row, not a crash."""


def measure(run_pass: Pass, prompts: list[list[int]], decode_tokens: int, repeat: int,
            batched: bool = True) -> dict:
    """Warm up, then time `repeat` passes at batch 1 and (if `batched`) batch len(prompts); medians."""
    batches = [prompts[:1], prompts] if batched else [prompts[:1]]
    for batch in batches:
        run_pass(batch, 2)
    runs: dict[str, list[float]] = {"prefill_tok_s": [], "decode_b1_tok_s": [], "decode_bn_tok_s": []}
    for _ in range(repeat):
        first, decode = run_pass(prompts[:1], decode_tokens)
        runs["prefill_tok_s"].append(len(prompts[0]) / first)
        runs["decode_b1_tok_s"].append(decode_tokens / decode)
        if batched:
            _, decode = run_pass(prompts, decode_tokens)
            runs["decode_bn_tok_s"].append(len(prompts) * decode_tokens / decode)
    return {k: statistics.median(v) if v else None for k, v in runs.items()}


def weight_bytes(model, embedding) -> tuple[int, int]:
    """(bytes of every weight, bytes one decoded token reads) of a torch model: all of them but the
    `embedding` table, of which a token gathers one row (a tied output projection reads it whole).
    Weights are the state dict's tensors (a tied table once), not scratch buffers such as RoPE's."""
    prefix = next(name for name, module in model.named_modules() if module is embedding) + "."
    named = model.state_dict(keep_vars=True)
    table = embedding.weight

    def unique_bytes(tensors) -> int:
        return sum(t.nbytes for t in {id(t): t for t in tensors}.values())

    read = unique_bytes(t for name, t in named.items() if not name.startswith(prefix))
    return unique_bytes(named.values()), read + table.nbytes // table.shape[0]


def kv_bytes_per_position(n_layers: int, n_kv_heads: int, head_dim: int, element_size: int) -> int:
    """Bytes of keys and values one cached position holds across the layers (a decode step reads
    this much per position it attends to)."""
    return 2 * n_layers * n_kv_heads * head_dim * element_size


def _set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def run_ours(spec: dict) -> dict:
    import torch

    import mistral7b
    from mistral7b.engine import Engine, Request
    from mistral7b.sampling import SamplingParams

    _set_threads(spec["threads"])
    quant = {"quantize": spec["quantize"], "group_size": spec["group_size"]} if spec["quantize"] else {}
    quant = {k: v for k, v in quant.items() if v is not None}
    try:
        model = mistral7b.load(spec["model"], dtype=spec["dtype"], **quant)
    except TypeError as e:
        if quant and "unexpected keyword" in str(e):
            raise Skipped("mistral7b.load does not take quantize= yet") from None
        raise
    prompts, decode_tokens = spec["prompts"], spec["decode_tokens"]
    prompt_len = len(prompts[0])
    # As the library's generate(): the whole prompt in one chunk (a window's worth for windowed models).
    chunk = model.args.sliding_window or prompt_len
    engines = {n: Engine(model, max_num_seqs=n, max_model_len=prompt_len + decode_tokens + 1,
                         max_tokens_per_step=n * chunk, chunk_size=chunk) for n in {1, len(prompts)}}

    def run_pass(batch: list[list[int]], n: int) -> tuple[float, float]:
        engine = engines[len(batch)]
        params = SamplingParams(max_tokens=n + 1, temperature=0.0, ignore_eos=True)
        pending = {engine.add_request(Request(list(p), params)).request_id for p in batch}
        start = time.perf_counter()
        first = None
        while engine.has_work:
            for out in engine.step():
                pending.discard(out.request_id)
            if first is None and not pending:
                first = time.perf_counter()
        return first - start, time.perf_counter() - first

    result = measure(run_pass, prompts, decode_tokens, spec["repeat"])
    total, per_token = weight_bytes(model, model.tok_embeddings)
    a = model.args
    element = torch.empty((), dtype=model.dtype).element_size()
    return {**result, "weight_bytes": total, "weight_bytes_per_token": per_token,
            "kv_bytes_per_position": kv_bytes_per_position(a.n_layers, a.n_kv_heads, a.head_dim, element)}


class _Clock:
    """A transformers streamer that only notes when each step's tokens arrive (the prompt first)."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def run_transformers(spec: dict) -> dict:
    import torch

    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise Skipped("transformers is not installed") from None
    _set_threads(spec["threads"])
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[spec["dtype"]]
    try:
        model = AutoModelForCausalLM.from_pretrained(spec["hf_dir"], dtype=dtype).eval()
    except (OSError, ValueError, KeyError) as e:
        raise Skipped(f"transformers cannot load it ({str(e).splitlines()[0]})") from None

    def run_pass(batch: list[list[int]], n: int) -> tuple[float, float]:
        ids = torch.tensor(batch)
        clock = _Clock()
        # min_new_tokens keeps EOS out: exactly n + 1 tokens per sequence, as ignore_eos does.
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n + 1, min_new_tokens=n + 1,
                       do_sample=False, pad_token_id=0, streamer=clock)
        t = clock.times  # [prompt, first token, ..., last token]
        return t[1] - t[0], t[-1] - t[1]

    result = measure(run_pass, spec["prompts"], spec["decode_tokens"], spec["repeat"])
    total, per_token = weight_bytes(model, model.get_input_embeddings())
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv = kv_bytes_per_position(c.num_hidden_layers, c.num_key_value_heads, head_dim, dtype.itemsize)
    return {**result, "weight_bytes": total, "weight_bytes_per_token": per_token, "kv_bytes_per_position": kv}


def _gguf_weights(path: Path) -> dict:
    """A GGUF file's weights as llama.cpp runs them: their commonest type, bytes, and the bytes one
    decoded token reads (as weight_bytes counts them)."""
    from collections import Counter

    from mistral7b.weights.gguf import open_file

    tensors = open_file(path).tensors
    table = tensors["token_embd.weight"]
    total = sum(t.nbytes for t in tensors.values())
    tied = "output.weight" not in tensors  # llama.cpp then projects with the embedding table
    types = Counter(t.type.name for t in tensors.values())
    return {"config": types.most_common(1)[0][0], "weight_bytes": total,
            "weight_bytes_per_token": total - (0 if tied else table.nbytes) + table.nbytes // table.shape[0]}


def run_llama_cpp(spec: dict) -> dict:
    try:
        from llama_cpp import Llama
    except ImportError:
        raise Skipped("llama-cpp-python is not installed") from None
    from mistral7b.weights.gguf import read_args

    prompts, decode_tokens = spec["prompts"], spec["decode_tokens"]
    threads = spec["threads"]
    llm = Llama(spec["model"], n_threads=threads, n_threads_batch=threads, verbose=False,
                n_ctx=len(prompts[0]) + decode_tokens + 8, n_batch=max(512, len(prompts[0])))

    def run_pass(batch: list[list[int]], n: int) -> tuple[float, float]:
        llm.reset()  # the next eval overwrites the KV cache from position 0
        start = time.perf_counter()
        llm.eval(batch[0])
        token = llm.sample(top_k=1, temp=0.0)
        first = time.perf_counter()
        for _ in range(n):
            llm.eval([token])
            token = llm.sample(top_k=1, temp=0.0)
        return first - start, time.perf_counter() - first

    # llama-cpp-python's Llama holds one sequence: no batch-N decode here.
    result = measure(run_pass, prompts, decode_tokens, spec["repeat"], batched=False)
    a = read_args(Path(spec["model"]))
    kv = kv_bytes_per_position(a.n_layers, a.n_kv_heads, a.head_dim, 2)  # llama.cpp caches K and V in f16
    return {**result, **_gguf_weights(Path(spec["model"])), "kv_bytes_per_position": kv,
            "note": "llama-cpp-python runs one sequence: no batch-N decode"}


def measure_bandwidth(threads: int, nbytes: int) -> float:
    """Memory read speed in GB/s (1e9 bytes): the best of several sums of an fp32 tensor of `nbytes`."""
    import torch

    _set_threads(threads)
    x = torch.ones(nbytes // 4)
    x.sum()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return x.nbytes / best / 1e9


def run_export(spec: dict) -> dict:
    import mistral7b

    mistral7b.save(mistral7b.load(spec["model"]), spec["out"], format="hf")
    return {}


RUNNERS = {"ours": run_ours, "transformers": run_transformers, "llama.cpp": run_llama_cpp, "export": run_export}


def main(spec_path: str, result_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    try:
        result = RUNNERS[spec["kind"]](spec)
    except Skipped as e:
        result = {"skipped": str(e)}
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    Path(result_path).write_text(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:])
