"""One measurement in its own process, so its peak memory is its own:

    python -m mistral7b.bench.worker SPEC.json RESULT.json

SPEC["kind"] picks it: "ours", "transformers", "llama.cpp" (the same workload through each, see
measure.py) or "export" (write a Hugging Face copy of the checkpoint for transformers). RESULT gets
the numbers, or {"skipped": reason} when the engine cannot run here; either way plus "peak_rss_mib".
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

from .measure import Skipped, kv_bytes_per_position, measure, set_threads, weight_bytes
from .peers import run_llama_cpp, run_transformers


def run_ours(spec: dict) -> dict:
    import mistral7b
    from mistral7b.engine import Engine, Request
    from mistral7b.engine.engine import default_chunk_size
    from mistral7b.sampling import SamplingParams

    set_threads(spec["threads"])
    quant = {"quantize": spec["quantize"]} if spec["quantize"] else {}  # only when asked: load may not take it
    if quant and spec["group_size"]:
        quant["group_size"] = spec["group_size"]
    try:
        model = mistral7b.load(spec["model"], dtype=spec["dtype"], **quant)
    except TypeError as e:
        if quant and "unexpected keyword" in str(e):
            raise Skipped("mistral7b.load does not take quantize= yet") from None
        raise
    prompts, decode_tokens = spec["prompts"], spec["decode_tokens"]
    prompt_len = len(prompts[0])
    chunk = default_chunk_size(model.args, prompt_len)  # as the library's generate()
    engines = {n: Engine(model, max_num_seqs=n, max_model_len=prompt_len + decode_tokens + 1,
                         max_tokens_per_step=n * chunk, chunk_size=chunk, prefix_caching=False)  # each pass pre-fills
               for n in {1, len(prompts)}}

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
    element = engines[1].cache_dtype.itemsize  # the cache's own dtype (fp16 for quantized models)
    return {**result, "weight_bytes": total, "weight_bytes_per_token": per_token,
            "kv_bytes_per_position": kv_bytes_per_position(a.n_layers, a.n_kv_heads, a.head_dim, element)}


def run_export(spec: dict) -> dict:
    import mistral7b

    mistral7b.save(mistral7b.load(spec["model"]), spec["out"], format="hf")
    return {}


RUNNERS = {"ours": run_ours, "transformers": run_transformers, "llama.cpp": run_llama_cpp, "export": run_export}


def peak_rss_mib() -> float:
    """This process's peak resident memory. Linux's VmHWM, not ru_maxrss: that one carries the
    parent's peak over fork + exec, so every worker would report at least the parent's."""
    status = Path("/proc/self/status")
    if status.exists():
        return next(int(line.split()[1]) for line in status.read_text().splitlines() if line.startswith("VmHWM:")) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # macOS: bytes


def main(spec_path: str, result_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    try:
        result = RUNNERS[spec["kind"]](spec)
    except Skipped as e:
        result = {"skipped": str(e)}
    result["peak_rss_mib"] = peak_rss_mib()
    Path(result_path).write_text(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:])
