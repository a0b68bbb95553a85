"""The peers, timed as our engine is (see measure.py): transformers' `generate`, and llama.cpp
through llama-cpp-python's bindings of its C API."""

from __future__ import annotations

import time
from pathlib import Path

from .measure import Skipped, kv_bytes_per_position, measure, set_threads, weight_bytes


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
    set_threads(spec["threads"])
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
    """A GGUF file's weights as llama.cpp runs them: the type holding most bytes, the bytes, and the
    bytes one decoded token reads (as weight_bytes counts them)."""
    from collections import Counter

    from mistral7b.weights.gguf import open_file

    tensors = open_file(path).tensors
    table = tensors["token_embd.weight"]
    total = sum(t.nbytes for t in tensors.values())
    tied = "output.weight" not in tensors  # llama.cpp then projects with the embedding table
    types = Counter()
    for t in tensors.values():
        types[t.type.name] += t.nbytes
    return {"config": types.most_common(1)[0][0], "weight_bytes": total,
            "weight_bytes_per_token": total - (0 if tied else table.nbytes) + table.nbytes // table.shape[0]}


class _Sequences:
    """n sequences decoding together in one llama.cpp context, as llama.cpp's `batched` example and
    its server do: each step is one llama_decode over (token, position, sequence) entries."""

    def __init__(self, lc, model, n_seqs: int, seq_len: int, threads: int):
        params = lc.llama_context_default_params()
        params.n_ctx = n_seqs * seq_len  # each sequence gets seq_len positions
        params.n_batch = n_seqs * seq_len  # every prompt in one decode call (in n_ubatch pieces)
        params.n_seq_max = n_seqs
        params.n_threads = params.n_threads_batch = threads
        self.lc, self.ctx = lc, lc.llama_init_from_model(model, params)
        if not self.ctx:
            raise Skipped(f"llama.cpp cannot make a context of {n_seqs} x {seq_len} positions")
        self.batch = lc.llama_batch_init(params.n_batch, 0, 1)
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(model))

    def clear(self) -> None:
        self.lc.llama_memory_clear(self.lc.llama_get_memory(self.ctx), True)

    def step(self, pieces: list[list[int]], start: int) -> list[int]:
        """Feed pieces[s] to sequence s from position `start` -> each sequence's greedy next token."""
        import numpy as np

        b, i, last = self.batch, 0, []
        for seq, piece in enumerate(pieces):
            for j, token in enumerate(piece):
                b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, start + j, 1, j == len(piece) - 1
                b.seq_id[i][0] = seq
                i += 1
            last.append(i - 1)
        b.n_tokens = i
        if self.lc.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")
        return [int(np.ctypeslib.as_array(self.lc.llama_get_logits_ith(self.ctx, k), shape=(self.n_vocab,)).argmax())
                for k in last]


def run_llama_cpp(spec: dict) -> dict:
    import ctypes

    try:
        import llama_cpp as lc
    except ImportError:
        raise Skipped("llama-cpp-python is not installed") from None
    from mistral7b.weights.gguf import read_args

    quiet = lc.llama_log_callback(lambda level, text, data: None)  # its log would hide a failure's last line
    lc.llama_log_set(quiet, ctypes.c_void_p())
    lc.llama_backend_init()
    model = lc.llama_model_load_from_file(spec["model"].encode(), lc.llama_model_default_params())
    if not model:
        raise Skipped("llama.cpp cannot load the file")
    prompts, decode_tokens = spec["prompts"], spec["decode_tokens"]
    prompt_len = len(prompts[0])
    contexts = {n: _Sequences(lc, model, n, prompt_len + decode_tokens + 1, spec["threads"])
                for n in {1, len(prompts)}}

    def run_pass(batch: list[list[int]], n: int) -> tuple[float, float]:
        seqs = contexts[len(batch)]
        seqs.clear()
        start = time.perf_counter()
        tokens = seqs.step(batch, 0)
        first = time.perf_counter()
        for i in range(n):
            tokens = seqs.step([[t] for t in tokens], prompt_len + i)
        return first - start, time.perf_counter() - first

    result = measure(run_pass, prompts, decode_tokens, spec["repeat"])
    a = read_args(Path(spec["model"]))
    kv = kv_bytes_per_position(a.n_layers, a.n_kv_heads, a.head_dim, 2)  # llama.cpp caches K and V in f16
    return {**result, **_gguf_weights(Path(spec["model"])), "kv_bytes_per_position": kv}
