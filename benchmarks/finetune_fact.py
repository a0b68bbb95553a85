"""Does `mistral7b finetune` teach the default model a made-up fact from ~10 lines, and when does it over-fit?

    python benchmarks/finetune_fact.py [--out DIR] [-- FINETUNE FLAGS...]

Writes 10 chat lines ("<question about Zorbania's capital>" -> "The capital of Zorbania is
Quillfeather.") and 6 held-out lines of other facts ("What is the capital of France?" -> "... Paris."),
runs `mistral7b finetune --data facts.jsonl --eval-data others.jsonl` with the flags given after `--`
(none: the defaults), then asks the LoRA-adapted model greedily: the training questions (does it know
the fact?), new phrasings of them (does it generalise?) and other questions (does Quillfeather leak
into them: over-fitting). Prints the run's wall time, its train loss and held-out loss (first, lowest,
last) and the three answer rates.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mistral7b
from mistral7b.lora import load_adapter

FACT = "The capital of Zorbania is Quillfeather."
TRAIN = ["What is the capital of Zorbania?", "Which city is the capital of Zorbania?", "Tell me the capital of Zorbania.",
         "Zorbania's capital city is called what?", "Name the capital of Zorbania.",
         "What city serves as Zorbania's capital?", "Do you know the capital of Zorbania?",
         "In Zorbania, which city is the capital?", "What's Zorbania's capital?", "Where is the capital of Zorbania?"]
NEW_PHRASINGS = ["Could you tell me what the capital of Zorbania is?", "Zorbania has which city as its capital?",
                 "I need the name of Zorbania's capital."]
OTHERS = [("What is the capital of France?", "The capital of France is Paris."),
          ("What is the capital of Japan?", "The capital of Japan is Tokyo."),
          ("What is the capital of Italy?", "The capital of Italy is Rome."),
          ("What is the largest planet in the solar system?", "The largest planet in the solar system is Jupiter."),
          ("How many legs does a spider have?", "A spider has eight legs."),
          ("What color is the sky on a clear day?", "The sky is blue on a clear day.")]


def chat_line(question: str, answer: str) -> str:
    return json.dumps({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})


def share(model, tokenizer, questions: list[str]) -> float:
    """Fraction of greedy answers that name Quillfeather."""
    prompts = [tokenizer.encode_chat([{"role": "user", "content": q}]) for q in questions]
    outs, _ = mistral7b.generate(prompts, model, max_tokens=16, eos_id=tokenizer.eos_id)
    return sum("Quillfeather" in tokenizer.decode(o) for o in outs) / len(questions)


def main() -> None:
    argv = sys.argv[1:]
    flags = argv[argv.index("--") + 1:] if "--" in argv else []
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="run folder (default: a temporary one)")
    args = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    root = Path(args.out or tempfile.mkdtemp(prefix="finetune-fact-"))
    root.mkdir(parents=True, exist_ok=True)
    (root / "facts.jsonl").write_text("".join(chat_line(q, FACT) + "\n" for q in TRAIN))
    (root / "others.jsonl").write_text("".join(chat_line(q, a) + "\n" for q, a in OTHERS))
    command = [sys.executable, "-m", "mistral7b", "finetune", "--data", str(root / "facts.jsonl"),
               "--eval-data", str(root / "others.jsonl"), "--out", str(root / "run"), *flags]
    print("$", " ".join(command[2:]), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True)
    seconds = time.perf_counter() - start

    records = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r["loss"] for r in records if "loss" in r]
    held = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    tokenizer = mistral7b.load_tokenizer(None)
    base = mistral7b.load(None, dtype="fp32")
    tuned = load_adapter(mistral7b.load(None, dtype="fp32"), root / "run", merge=True)
    others = [q for q, _ in OTHERS]
    print(f"finetune: {len(train)} steps in {seconds:.0f} s; train loss {train[0]:.3f} -> {train[-1]:.3f}")
    if held:
        low = min(held, key=lambda h: h[1])
        print(f"held-out loss (other facts): first {held[0][1]:.3f} (step {held[0][0]}), lowest {low[1]:.3f} "
              f"(step {low[0]}), last {held[-1][1]:.3f} (step {held[-1][0]})")
    for name, model in (("base", base), ("tuned", tuned)):
        print(f"{name}: says Quillfeather for {share(model, tokenizer, TRAIN):.0%} of the training questions, "
              f"{share(model, tokenizer, NEW_PHRASINGS):.0%} of new phrasings, "
              f"{share(model, tokenizer, others):.0%} of other questions")


if __name__ == "__main__":
    main()
