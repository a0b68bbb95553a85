"""Sliding-window attention: prefill time and KV-cache memory, window 4096 vs full causal attention.

    python benchmarks/sliding_window.py [--tokens 16384] [--window 4096] [--repeats 1]
                                        [--sections memory,model,flex,layer7b] [--json out.json]

1. Prefill of one `--tokens` sequence through the same weights with `sliding_window=W` and with no
   window (full causal), timing the whole forward and, inside it, attention alone (every call of
   `mistral7b.attention.attend`): one shot (blocked band vs causal SDPA) and chunked through the KV
   cache as the engine does (chunks of W, and of 1024). The model is attention-bound on purpose:
   real head_dim 128 but 4 query heads over 1 KV head (one GQA group of Mistral 7B) and a narrow
   MLP, so the attention claim shows in the totals. Section `layer7b`: one layer with Mistral 7B's
   real dims, where at 16k tokens the projections and MLP do most of the work. Section `flex`:
   attention alone through FlexAttention (compiled) beside our blocks.
2. KV-cache bytes per sequence with Mistral 7B's dims in fp16, 1k..32k tokens, W=4096 vs no window
   (`KVCache(...).nbytes_per_sequence()`), and the RSS growth of allocating each cache.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

import mistral7b
import mistral7b.model

MISTRAL_7B = mistral7b.ModelArgs(dim=4096, n_layers=32, head_dim=128, hidden_dim=14336, n_heads=32, n_kv_heads=8,
                                 norm_eps=1e-5, vocab_size=32000, sliding_window=4096)
# Attention-bound: one GQA group of Mistral 7B per layer, MLP 2x dim.
ATTENTION_BOUND = mistral7b.ModelArgs(dim=512, n_layers=2, head_dim=128, hidden_dim=1024, n_heads=4, n_kv_heads=1,
                                      norm_eps=1e-5, vocab_size=32000, sliding_window=4096)


class AttentionTimer:
    """Wraps the model's attention call, summing its wall time."""

    def __init__(self):
        self.seconds = 0.0
        self.inner = mistral7b.model.attend

    def __call__(self, *args):
        start = time.perf_counter()
        out = self.inner(*args)
        self.seconds += time.perf_counter() - start
        return out

    def __enter__(self):
        mistral7b.model.attend = self
        return self

    def __exit__(self, *exc):
        mistral7b.model.attend = self.inner


def build(args: mistral7b.ModelArgs, window: int | None, state: dict | None) -> mistral7b.Transformer:
    model = mistral7b.Transformer(dataclasses.replace(args, sliding_window=window)).eval()
    if state is not None:
        model.load_state_dict(state)
    return model


@torch.no_grad()
def prefill(model: mistral7b.Transformer, ids: torch.Tensor, chunk: int | None) -> tuple[float, float]:
    """-> (total s, attention s) of one prefill, only the last position's logits, as generation needs."""
    last = torch.tensor([len(ids) - 1])
    with AttentionTimer() as timer:
        start = time.perf_counter()
        if chunk is None:
            model(ids, [len(ids)], output_rows=last)
        else:
            cache = model.new_cache(1, max_len=len(ids))
            for i in range(0, len(ids), chunk):
                piece = ids[i:i + chunk]
                model(piece, [len(piece)], cache, output_rows=torch.tensor([len(piece) - 1]))
        total = time.perf_counter() - start
    return total, timer.seconds


def prefill_table(args: mistral7b.ModelArgs, tokens: int, window: int, paths: dict[str, int | None],
                  repeats: int) -> list[dict]:
    torch.manual_seed(0)
    windowed = build(args, window, None)
    full = build(args, None, windowed.state_dict())
    ids = torch.randint(0, args.vocab_size, (tokens,))
    prefill(full, ids[:256], None)  # warm-up: first-call allocations and thread pool start
    rows = []
    for path, chunk in paths.items():
        # Best of `repeats` (total, attention) pairs, alternating the two models.
        runs = [(prefill(full, ids, chunk), prefill(windowed, ids, chunk)) for _ in range(repeats)]
        (t_full, a_full), (t_win, a_win) = min(r[0] for r in runs), min(r[1] for r in runs)
        rows.append(dict(path=path, full_s=t_full, window_s=t_win, full_attn_s=a_full, window_attn_s=a_win))
        print(f"{path:>22} {t_full:9.2f} {t_win:9.2f} {t_full / t_win:7.2f}x  {a_full:9.2f} {a_win:9.2f} "
              f"{a_full / a_win:7.2f}x", flush=True)
    return rows


def flex_table(tokens: int, window: int, repeats: int) -> dict:
    """Attention alone, one GQA group of Mistral 7B (4 heads x 128 over 1 KV head): causal SDPA, our
    blocks, and FlexAttention with a sliding-window block mask (on CPU it needs torch.compile)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from mistral7b.attention import sliding_window_attention

    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, tokens, 128, generator=g)
    k, v = (torch.randn(1, 1, tokens, 128, generator=g) for _ in range(2))
    start = time.perf_counter()
    block_mask = torch.compile(create_block_mask)(lambda b, h, i, j: (j <= i) & (i - j < window), None, None,
                                                  tokens, tokens, device="cpu")
    flex = torch.compile(flex_attention)
    flex(q, k, v, block_mask=block_mask, enable_gqa=True)
    row = dict(flex_compile_s=time.perf_counter() - start)
    calls = dict(causal=lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                                enable_gqa=True),
                 blocks=lambda: sliding_window_attention(q, k, v, window),
                 flex=lambda: flex(q, k, v, block_mask=block_mask, enable_gqa=True))
    for name, call in calls.items():
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        row[f"{name}_s"] = min(times)
    print(f"causal SDPA {row['causal_s']:.2f} s, blocks {row['blocks_s']:.2f} s "
          f"({row['causal_s'] / row['blocks_s']:.2f}x), flex {row['flex_s']:.2f} s "
          f"({row['causal_s'] / row['flex_s']:.2f}x) after {row['flex_compile_s']:.0f} s of mask + compile", flush=True)
    return row


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def memory_table(window: int) -> list[dict]:
    rows = []
    for tokens in (1024, 2048, 4096, 8192, 16384, 32768):
        row = dict(tokens=tokens)
        for name, w in (("full", None), ("window", window)):
            args = dataclasses.replace(MISTRAL_7B, sliding_window=w)
            before = rss_bytes()
            cache = mistral7b.KVCache(args, 1, tokens, dtype=torch.float16)
            row[f"{name}_bytes"] = cache.nbytes_per_sequence()
            row[f"{name}_rss"] = rss_bytes() - before
            del cache
        rows.append(row)
        print(f"{tokens:>7} {row['full_bytes'] / 2**20:10.0f} {row['window_bytes'] / 2**20:10.0f} "
              f"{row['window_bytes'] / row['full_bytes']:6.2f}  {row['full_rss'] / 2**20:10.0f} "
              f"{row['window_rss'] / 2**20:10.0f}", flush=True)
    return rows


SECTIONS = ("memory", "model", "flex", "layer7b")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--window", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=1, help="best of this many runs per prefill")
    parser.add_argument("--sections", default="memory,model",
                        help=f"comma-separated, of {', '.join(SECTIONS)} (flex and layer7b are slow)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    sections = args.sections.split(",")
    if not set(sections) <= set(SECTIONS):
        parser.error(f"--sections takes {', '.join(SECTIONS)}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.tokens} tokens, W={args.window}")
    results = {}
    # Memory first, before the prefills' freed buffers can be reused and hide RSS growth.
    if "memory" in sections:
        print(f"\nKV cache per sequence, Mistral 7B dims, fp16 (MiB)\n{'tokens':>7} {'full':>10} {'window':>10} "
              f"{'ratio':>6}  {'full RSS':>10} {'win RSS':>10}")
        results["kv_cache"] = memory_table(args.window)

    header = f"{'prefill':>22} {'full s':>9} {'window s':>9} {'ratio':>8}  {'attn full':>9} {'attn win':>9} {'ratio':>8}"
    if "model" in sections:
        paths = {"one shot": None, f"chunked by {args.window}": args.window, "chunked by 1024": 1024}
        print("\nattention-bound model (2 layers, 4 heads x 128 over 1 KV head, dim 512)\n" + header)
        results["attention_bound"] = prefill_table(ATTENTION_BOUND, args.tokens, args.window, paths, args.repeats)
    if "layer7b" in sections:
        print("\none layer with Mistral 7B's dims (32 heads x 128, 8 KV heads, dim 4096, MLP 14336)\n" + header)
        layer = dataclasses.replace(MISTRAL_7B, n_layers=1, vocab_size=256)
        results["mistral_7b_layer"] = prefill_table(layer, args.tokens, args.window, {"one shot": None}, args.repeats)
    if "flex" in sections:
        print("\nattention alone, 4 heads x 128 over 1 KV head: FlexAttention vs blocks")
        results["flex"] = flex_table(args.tokens, args.window, args.repeats)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
