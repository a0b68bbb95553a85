"""Log-likelihood scoring speed: `mistral7b eval`'s engine against lm-eval's `hf` (transformers)
backend, on the same multiple-choice task and the same SmolLM2-135M-Instruct weights.

    python benchmarks/eval_speed.py [--docs 64] [--threads 2] [--batch 16]

The task is the arc_easy fixture (tests/fixtures/eval) numbered and repeated to --docs distinct
documents, scored 0-shot with lm-eval's arc_easy template. The default GGUF is exported as a
Hugging Face folder (fp32 weights, tokenizer.json) for lm-eval. Each side runs in its own process
with the same thread count and is timed after its model is loaded; examples/s = documents /
seconds. Both accuracies are printed too: the same weights should give the same acc and acc_norm.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "eval" / "arc_easy" / "test.jsonl"
YAML = """task: fx_arc_easy
dataset_path: json
dataset_kwargs: {{data_files: {{test: {path}}}}}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{choices.label.index(answerKey)}}}}"
doc_to_choice: "{{{{choices.text}}}}"
metric_list: [{{metric: acc}}, {{metric: acc_norm}}]
"""

OURS = """
import json, sys, time, torch
torch.set_num_threads({threads})
import mistral7b
from mistral7b.eval import EngineBackend, TASKS, evaluate
backend = EngineBackend(mistral7b.load(None), mistral7b.load_tokenizer(None), name="ours", progress=False,
                        max_num_seqs={batch})
start = time.perf_counter()
scores, n = evaluate(TASKS["arc_easy"], backend, {data!r}, num_fewshot=0)
print(json.dumps({{"seconds": time.perf_counter() - start, "docs": n, **scores}}))
"""

HF = """
import json, time, torch
torch.set_num_threads({threads})
from lm_eval import simple_evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
lm = HFLM(pretrained={folder!r}, dtype="float32", batch_size={batch}, device="cpu")
start = time.perf_counter()
out = simple_evaluate(model=lm, tasks=["fx_arc_easy"], task_manager=TaskManager(include_path={data!r}),
                      num_fewshot=0, log_samples=False)
r = out["results"]["fx_arc_easy"]
print(json.dumps({{"seconds": time.perf_counter() - start, "acc": r["acc,none"], "acc_norm": r["acc_norm,none"]}}))
"""


def prepare(tmp: Path, docs: int) -> Path:
    """Task data (arc_easy layout + lm-eval YAML) and the HF export of the default model."""
    import mistral7b

    rows = [json.loads(line) for line in FIXTURE.read_text().splitlines()]
    (tmp / "arc_easy").mkdir()
    data = tmp / "arc_easy" / "test.jsonl"
    # Every document distinct (numbered questions): lm-eval's hf backend reuses the logits of
    # identical requests, so plain repeats would time a cache, not scoring.
    data.write_text("".join(json.dumps({**row, "id": f"doc{i}", "question": f"{i + 1}. {row['question']}"}) + "\n"
                            for i, row in ((i, rows[i % len(rows)]) for i in range(docs))))
    (tmp / "fx_arc_easy.yaml").write_text(YAML.format(path=data))
    folder = tmp / "hf"
    mistral7b.save(mistral7b.load(None), folder, format="hf")
    tok = mistral7b.load_tokenizer(None)
    tok.backend.save(str(folder / "tokenizer.json"))
    names = {i: t for t, i in tok.special_tokens.items()}
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": names.get(tok.bos_id), "eos_token": names.get(tok.eos_id)}))
    return folder


def child(code: str) -> dict:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
                               "HOME": str(Path.home()), "TOKENIZERS_PARALLELISM": "false"})
    if done.returncode:
        sys.exit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16, help="sequences per forward, both sides")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = prepare(Path(tmp), args.docs)
        ours = child(OURS.format(threads=args.threads, batch=args.batch, data=tmp))
        hf = child(HF.format(threads=args.threads, batch=args.batch, folder=str(folder), data=tmp))
    rate = {"ours": args.docs / ours["seconds"], "lm-eval hf": args.docs / hf["seconds"]}
    print(f"{args.docs} docs ({args.docs * 11 // 4} log-likelihood requests), {args.threads} threads, batch {args.batch}")
    for name, r in (("ours", ours), ("lm-eval hf", hf)):
        print(f"{name:>11}: {rate[name]:6.2f} examples/s  ({r['seconds']:.1f} s)  acc {r['acc']:.3f}  acc_norm {r['acc_norm']:.3f}")
    print(f"ratio ours / lm-eval hf: {rate['ours'] / rate['lm-eval hf']:.2f}x")


if __name__ == "__main__":
    main()
