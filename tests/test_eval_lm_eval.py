"""Our scores equal lm-eval's on the same fixture tasks and the same server: multiple-choice acc and
acc_norm (log-likelihoods) and a generation task's exact match (greedy `generate_until`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from argparse import Namespace

import pytest

from _eval_fakes import FIXTURES
from _server import start_server, stop_server
from mistral7b.eval.cli import run

MODEL = "SmolLM2-135M-Instruct"
# lm-eval's own arc_easy, boolq and nq_open templates, pointed at our fixture files.
TASKS = {
    "fx_arc_easy": """task: fx_arc_easy
dataset_path: json
dataset_kwargs: {{data_files: {{test: {dir}/arc_easy/test.jsonl}}}}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{choices.label.index(answerKey)}}}}"
doc_to_choice: "{{{{choices.text}}}}"
metric_list: [{{metric: acc}}, {{metric: acc_norm}}]
""",
    "fx_boolq": """task: fx_boolq
dataset_path: json
dataset_kwargs: {{data_files: {{validation: {dir}/boolq/validation.jsonl}}}}
validation_split: validation
output_type: multiple_choice
doc_to_text: "{{{{passage}}}}\nQuestion: {{{{question}}}}?\nAnswer:"
doc_to_target: label
doc_to_choice: ["no", "yes"]
metric_list: [{{metric: acc}}]
""",
    "fx_nq_open": """task: fx_nq_open
dataset_path: json
dataset_kwargs: {{data_files: {{validation: {dir}/nq_open/validation.jsonl}}}}
validation_split: validation
output_type: generate_until
description: "Answer these questions:\\n\\n"
doc_to_text: "Q: {{{{question}}}}?\\nA:"
doc_to_target: "{{{{answer}}}}"
target_delimiter: " "
generation_kwargs: {{until: ["\\n", ".", ","], do_sample: false, temperature: 0.0, max_gen_toks: 32}}
filter_list: [{{name: remove_whitespace, filter: [{{function: remove_whitespace}}, {{function: take_first}}]}}]
metric_list:
  - metric: exact_match
    ignore_case: true
    ignore_punctuation: true
    regexes_to_ignore: ["\\\\b(?:The |the |An |A |The |a |an )"]
""",
}


def test_our_scores_equal_lm_eval_through_the_same_server(tmp_path):
    pytest.importorskip("lm_eval")
    for name, text in TASKS.items():
        (tmp_path / f"{name}.yaml").write_text(text.format(dir=FIXTURES))
    proc, url = start_server("--max-model-len", "512", "--dtype", "fp32")
    try:
        env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        done = subprocess.run(
            [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args",
             f"model={MODEL},base_url={url}/v1/completions,num_concurrent=4,max_retries=1,tokenized_requests=True",
             "--tasks", ",".join(TASKS), "--include_path", str(tmp_path), "--output_path", str(tmp_path / "out")],
            capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        ours = run(Namespace(model=None, server=url, tasks="arc_easy,boolq,nq_open", data_dir=str(FIXTURES), limit=None,
                             num_fewshot=0, seed=1234, output=None, plot=None))
    finally:
        stop_server(proc)
    theirs = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]
    assert ours["results"]["arc_easy"] == {"acc": theirs["fx_arc_easy"]["acc,none"],
                                           "acc_norm": theirs["fx_arc_easy"]["acc_norm,none"]}
    assert ours["results"]["boolq"] == {"acc": theirs["fx_boolq"]["acc,none"]}
    assert ours["results"]["nq_open"] == {"exact_match": theirs["fx_nq_open"]["exact_match,remove_whitespace"]}
    assert ours["results"]["arc_easy"]["acc"] >= 0.5 and ours["results"]["nq_open"]["exact_match"] > 0  # not 0 == 0
