"""lm-eval's `local-completions` model against our server: its multiple-choice accuracy equals what our
own scoring of the same requests gives."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import mistral7b
from _server import start_server, stop_server

MODEL = "SmolLM2-135M-Instruct"
DOCS = [
    ("What is the capital of France?", ["Paris", "London", "Berlin", "Madrid"], 0),
    ("How many legs does a spider have?", ["six", "eight", "ten", "four"], 1),
    ("What color is the sky on a clear day?", ["green", "red", "blue", "yellow"], 2),
    ("Which animal says meow?", ["dog", "cow", "duck", "cat"], 3),
    ("What is 2 + 2?", ["four", "five", "three", "twenty two"], 0),
    ("Water freezes at what temperature in Celsius?", ["100 degrees", "0 degrees", "50 degrees", "-40 degrees"], 1),
    ("Which planet is known as the red planet?", ["Venus", "Jupiter", "Mars", "Saturn"], 2),
    ("What do bees make?", ["milk", "silk", "wool", "honey"], 3),
]
TASK = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def our_scores(model, tok) -> dict[str, float]:
    """acc / acc_norm by our own log-likelihoods, tokenised as lm-eval does (context, then the
    continuation as what the whole adds to the context's tokens)."""
    correct = correct_norm = 0
    loglikelihoods = []
    for question, choices, label in DOCS:
        context = f"Question: {question}\nAnswer:"
        context_ids = tok.encode(context)
        scores = []
        for choice in choices:
            whole = tok.encode(context + " " + choice)
            _, logprobs = mistral7b.generate([whole], model, max_tokens=0)
            continuation = logprobs[0][len(context_ids) - 1:]  # logprobs[i] scores token i + 1
            scores.append(sum(continuation))
        loglikelihoods.append(scores)
        correct += max(range(len(choices)), key=lambda i: scores[i]) == label
        norm = [s / len(" " + c) for s, c in zip(scores, choices)]
        correct_norm += max(range(len(choices)), key=lambda i: norm[i]) == label
    return {"acc": correct / len(DOCS), "acc_norm": correct_norm / len(DOCS), "loglikelihoods": loglikelihoods}


def their_loglikelihoods(out) -> list[list[float]]:
    """Per document, per choice, the log-likelihood lm-eval got from the server (--log_samples)."""
    samples = [json.loads(line) for f in out.rglob("samples_tiny_mc_*.jsonl") for line in f.read_text().splitlines()]
    return [[float(r[0][0]) for r in s["resps"]] for s in sorted(samples, key=lambda s: s["doc_id"])]


@pytest.mark.parametrize("weights", ["fp32", "int4"])
def test_lm_eval_local_completions_matches_our_scoring(tmp_path, weights):
    """fp32, and the default server's int4 (the GGUF's Q4_1 blocks): the server batches lm-eval's
    concurrent requests, and a request's log-likelihood does not depend on its batch (issue 20)."""
    pytest.importorskip("lm_eval")
    data = tmp_path / "tiny_mc.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "label": l}) + "\n" for q, c, l in DOCS))
    (tmp_path / "tiny_mc.yaml").write_text(TASK.format(data=data))
    proc, url = start_server("--max-model-len", "512", *(["--dtype", "fp32"] if weights == "fp32" else []))
    try:
        env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
        run = subprocess.run(
            [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args",
             f"model={MODEL},base_url={url}/v1/completions,num_concurrent=4,max_retries=1,tokenized_requests=True",
             "--tasks", "tiny_mc", "--include_path", str(tmp_path), "--output_path", str(tmp_path / "out"),
             "--log_samples"],
            capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
        assert run.returncode == 0, run.stderr[-3000:]
    finally:
        stop_server(proc)
    results_file = next((tmp_path / "out").rglob("results_*.json"))
    theirs = json.loads(results_file.read_text())["results"]["tiny_mc"]
    ours = our_scores(mistral7b.load(None, quantize="int4" if weights == "int4" else None), mistral7b.load_tokenizer(None))
    # Every request's log-likelihood, not only the accuracy (a few hundredths of a nat rarely flip an answer).
    flat = lambda rows: [x for row in rows for x in row]
    assert flat(their_loglikelihoods(tmp_path / "out")) == pytest.approx(flat(ours["loglikelihoods"]), abs=1e-6)
    assert theirs["acc,none"] == ours["acc"]
    assert theirs["acc_norm,none"] == ours["acc_norm"]
    assert ours["acc"] >= 0.5  # a real model, not chance (1/4)
