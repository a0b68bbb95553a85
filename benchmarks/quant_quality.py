"""How faithful are int8 / int4 models? Perplexity on a fixed text and top-1 agreement with the
unquantized model, for the built-in SmolLM2-135M (or --model).

    python benchmarks/quant_quality.py [--model PATH]

The built-in GGUF is Q4_1, so "fp32" is its weights dequantized, the model the other commands run
by default. int8 / int4 here quantize those fp32 weights with our quantizer (per-channel int8, int4
in groups of 32 and 64); "GGUF Q4_1 packed" is `load(quantize="int4")`, which keeps the file's own
blocks (its weights equal the fp32 model's, so only the activations' rounding in the GEMV differs).
Scored token by token through the decode path (batch-1 GEMV, the path whose rounding matters).
"""

from __future__ import annotations

import argparse
import math

import torch

import mistral7b
from mistral7b.quant import quantize
from mistral7b.runner import Runner

TEXT = """The history of the printing press begins in the fifteenth century, when Johannes Gutenberg, a
goldsmith from Mainz, combined several existing technologies into a system that could produce books
quickly and cheaply. Movable metal type, oil-based ink and a wooden press adapted from those used to
make wine allowed a small workshop to print hundreds of copies of a text in the time a scribe needed
to copy a single page. Within fifty years, presses were running in more than two hundred European
cities, and millions of books had been printed.

The consequences were enormous. Scholars could compare identical copies of a text, errors could be
corrected in the next edition, and ideas travelled faster than ever before. Pamphlets spread news and
arguments across borders, and literacy slowly became a skill that ordinary people could hope to
acquire. Many historians argue that the Reformation, the scientific revolution and the rise of
modern newspapers would have been impossible without the press.

Today, the same pattern repeats with digital technology. Every new way of copying and sharing
information lowers the cost of publishing, changes who can take part in public debate, and forces
institutions to adapt. Understanding how earlier societies coped with such change can help us think
more clearly about our own time."""


@torch.inference_mode()
def score(model, ids: torch.Tensor) -> tuple[float, torch.Tensor]:
    """(perplexity, argmax per position) of ids, decoded one token at a time through a KV cache."""
    runner, cache = Runner(model), model.new_cache(1, len(ids) + 1)
    logits = torch.cat([runner(ids[i:i + 1], [1], cache) for i in range(len(ids))])
    nll = torch.nn.functional.cross_entropy(logits[:-1], ids[1:])
    return math.exp(nll.item()), logits.argmax(-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint (default: the built-in SmolLM2-135M-Instruct)")
    args = parser.parse_args()
    ids = torch.tensor(mistral7b.load_tokenizer(args.model).encode(TEXT))
    base_ppl, base_top1 = score(mistral7b.load(args.model), ids)
    rows = [("fp32", base_ppl, 1.0)]
    variants = [("int8 (per channel)", lambda: quantize(mistral7b.load(args.model), "int8")),
                ("int8 G32", lambda: quantize(mistral7b.load(args.model), "int8", 32)),
                ("int4 G32", lambda: quantize(mistral7b.load(args.model), "int4", 32)),
                ("int4 G64", lambda: quantize(mistral7b.load(args.model), "int4", 64)),
                ("GGUF blocks packed (load(quantize='int4'))", lambda: mistral7b.load(args.model, quantize="int4"))]
    for name, make in variants:
        ppl, top1 = score(make(), ids)
        rows.append((name, ppl, (top1 == base_top1).float().mean().item()))
    print(f"{len(ids)} tokens")
    print(f"| weights | perplexity | vs fp32 | top-1 agreement |\n|---|---|---|---|")
    for name, ppl, agree in rows:
        print(f"| {name} | {ppl:.3f} | {100 * (ppl / base_ppl - 1):+.2f}% | {100 * agree:.1f}% |")


if __name__ == "__main__":
    main()
