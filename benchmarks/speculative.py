"""Speculative decoding (prompt lookup) against plain decoding, batch 1, the default model: an
input-grounded workload (repeat and edit a paragraph, edit code) and a free one (a story).

    python benchmarks/speculative.py [--configs int4,fp32] [--tokens 128] [--rounds 3]
    python benchmarks/speculative.py --batches 1,2,4,8 --workloads "edit a paragraph"   # where it stops paying

Prints generated tokens/s (the whole request, pre-fill included), their ratio, and the acceptance,
alternating plain and speculative runs in one process so that the machine's drift hits both alike.
"""

from __future__ import annotations

import argparse
import statistics
import time

import mistral7b
from mistral7b.engine import Engine, Request
from mistral7b.sampling import SamplingParams
from mistral7b.speculative import SpeculativeConfig

PARAGRAPH = ("The lighthouse stood at the end of the northern pier for more than a century. Its keeper, an old "
             "sailor named Tomas, climbed the spiral stairs every evening to light the lamp, and every morning "
             "he wrote the weather, the ships that passed and the birds he had seen in a thick leather book. "
             "When the harbour was modernised the lamp was replaced by an automatic beacon, but Tomas kept "
             "climbing the stairs, because, he said, somebody should still look at the sea.")
CODE = '''def mean(values):
    total = 0
    for value in values:
        total = total + value
    return total / len(values)


def variance(values):
    m = mean(values)
    total = 0
    for value in values:
        total = total + (value - m) ** 2
    return total / len(values)
'''
WORKLOADS = {
    "repeat a paragraph": f"Repeat the following paragraph exactly, word for word:\n\n{PARAGRAPH}",
    "edit a paragraph": f"Rewrite this paragraph with the keeper's name changed to Anna; keep everything else:\n\n{PARAGRAPH}",
    "edit code": f"Rename the function `mean` to `average` everywhere in this code and print the whole code:\n\n{CODE}",
    "free: a story": "Write a short story about a dragon who learns to bake bread.",
}


def timed(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> tuple[float, int, list[list[int]]]:
    requests = [engine.add_request(Request(p, params)) for p in prompts]
    tokens: dict[str, list[int]] = {r.request_id: [] for r in requests}
    start = time.perf_counter()
    while engine.has_work:
        for out in engine.step():
            tokens[out.request_id] += out.new_tokens
    return time.perf_counter() - start, sum(map(len, tokens.values())), [tokens[r.request_id] for r in requests]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="int4,fp32", help="comma-separated: int4 (the file's blocks), int8, fp32")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--k", type=int, default=5, help="guesses per step")
    ap.add_argument("--batches", default="1", help="comma-separated numbers of concurrent copies of a request")
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated workload names")
    ap.add_argument("--draft", metavar="PATH", help="also a draft model (its int4 copy) as the proposer")
    args = ap.parse_args()
    tokenizer = mistral7b.load_tokenizer(None)
    params = SamplingParams(max_tokens=args.tokens)  # greedy: the outputs must be equal
    proposers = {"ngram": SpeculativeConfig(num_tokens=args.k, max_batch=64)}
    if args.draft:
        proposers["draft"] = SpeculativeConfig("draft", num_tokens=args.k, max_batch=64,
                                               draft_model=mistral7b.load(args.draft, quantize="int4"))
    print("| weights | batch | workload | proposer | plain tok/s | speculative tok/s | speed-up | accepted "
          "| tokens per verification |")
    print("| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for config in args.configs.split(","):
        model = mistral7b.load(None, quantize=None if config == "fp32" else config)
        for batch in map(int, args.batches.split(",")):
            for name in args.workloads.split(","):
                prompt = tokenizer.encode_chat([{"role": "user", "content": WORKLOADS[name]}])
                for method, spec in proposers.items():
                    run_one(model, tokenizer, config, batch, name, method, spec, [prompt] * batch, params, args.rounds)


def run_one(model, tokenizer, config, batch, name, method, spec, prompts, params, rounds) -> None:
    rates = {"plain": [], "spec": []}
    for _ in range(rounds):  # alternating, so that the machine's drift hits both alike
        plain = Engine(model, tokenizer, max_num_seqs=len(prompts), max_model_len=2048, prefix_caching=False)
        guessed = Engine(model, tokenizer, max_num_seqs=len(prompts), max_model_len=2048, prefix_caching=False,
                         speculative=spec)
        seconds, n, expected = timed(plain, prompts, params)
        rates["plain"].append(n / seconds)
        seconds, n, tokens = timed(guessed, prompts, params)
        rates["spec"].append(n / seconds)
        assert tokens == expected, "speculative greedy output differs from plain decoding"
    p, s = statistics.median(rates["plain"]), statistics.median(rates["spec"])
    accepted = guessed.spec_accepted_total / max(1, guessed.spec_proposed_total)
    per_step = guessed.spec_accepted_total / max(1, guessed.spec_steps_total)
    print(f"| {config} | {batch} | {name} | {method} | {p:.1f} | {s:.1f} | {s / p:.2f}x | {accepted:.0%} "
          f"| {per_step:.2f} |", flush=True)


if __name__ == "__main__":
    main()
