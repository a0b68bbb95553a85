"""What a structured output costs: decode tokens/s of JSON-schema-constrained requests against free ones
(batch 1 and 8, same prompts, same run), and the time to compile a schema.

    python benchmarks/structured_speed.py [--quantize int4] [--tokens 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import mistral7b
from mistral7b.engine import Engine, Request
from mistral7b.sampling import SamplingParams
from mistral7b.structured import Constraint

# A record with a long free-text field, so that a constrained output runs as long as a free one.
SCHEMA = {"type": "object", "properties": {
    "title": {"type": "string", "maxLength": 60},
    "year": {"type": "integer", "minimum": 1800, "maximum": 2100},
    "tags": {"type": "array", "items": {"enum": ["drama", "comedy", "science", "history"]}, "maxItems": 3},
    "summary": {"type": "string", "minLength": 2000}},
    "required": ["title", "year", "tags", "summary"], "additionalProperties": False}


def decode_rate(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> float:
    """Generated tokens per second over the steps after every prompt's first token (decode only)."""
    for p in prompts:
        engine.add_request(Request(list(p), params))
    tokens, start = 0, None
    while engine.has_work:
        outs = engine.step()
        if start is None and len(outs) == len(prompts) and all(o.new_tokens for o in outs):
            start = time.perf_counter()  # every sequence has its first token: decode steps from here
            continue
        if start is not None:
            tokens += sum(len(o.new_tokens) for o in outs)
    return tokens / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quantize", default="int4", help="int4 (the default model's own blocks), int8 or none")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    model = mistral7b.load(None, quantize=None if args.quantize == "none" else args.quantize)
    tokenizer = mistral7b.load_tokenizer(None)
    engine = Engine(model, tokenizer, max_num_seqs=8, max_model_len=1024, prefix_caching=False)

    start = time.perf_counter()
    engine.grammars.ll_tokenizer  # the vocabulary, once per tokenizer
    vocab_s = time.perf_counter() - start
    compile_ms = []
    for i in range(5):
        schema = {**SCHEMA, "title": f"record {i}"}  # a new schema each time: nothing cached
        start = time.perf_counter()
        engine.grammars.compile(Constraint.json_schema(schema))
        compile_ms.append(1000 * (time.perf_counter() - start))
    print(f"llguidance vocabulary: {vocab_s:.2f} s once; compiling the schema: median {statistics.median(compile_ms):.1f} ms")

    topics = ["a film about the sea", "a comedy about cooks", "a history of clocks", "a science film about bees",
              "a drama in Rome", "a film about trains", "a comedy about cats", "a history of maps"]
    prompts = [tokenizer.encode_chat([{"role": "user", "content": f"Describe {t} as a JSON record."}]) for t in topics]
    free = SamplingParams(max_tokens=args.tokens, ignore_eos=True)
    constrained = SamplingParams(max_tokens=args.tokens, ignore_eos=True, constraint=Constraint.json_schema(SCHEMA))
    print("| batch | free tok/s | json_schema tok/s | constrained / free |\n| ---: | ---: | ---: | ---: |")
    for batch in (1, 8):
        rates = {"free": [], "json": []}
        for _ in range(args.rounds):  # alternate, so drift hits both alike
            rates["free"].append(decode_rate(engine, prompts[:batch], free))
            rates["json"].append(decode_rate(engine, prompts[:batch], constrained))
        f, c = statistics.median(rates["free"]), statistics.median(rates["json"])
        print(f"| {batch} | {f:.1f} | {c:.1f} | {c / f:.2f} |")
    print(json.dumps({"compile_ms": compile_ms, "vocabulary_s": vocab_s}))


if __name__ == "__main__":
    main()
