"""The multiple-choice and generation paths end to end on the real default model (SmolLM2), and
maj@k's samples really differ."""

from __future__ import annotations

import json

import pytest
import torch

import mistral7b
from _eval_fakes import FIXTURES
from mistral7b.eval import EngineBackend, Sampling
from mistral7b.eval.__main__ import main


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on 2 shared cores, two spinning OpenMP threads run ~10x slower under load."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def backend():
    return EngineBackend(mistral7b.load(None), mistral7b.load_tokenizer(None), name="smollm2", progress=False)


def test_command_scores_multiple_choice_and_generation_end_to_end(tmp_path, capsys):
    out = tmp_path / "report.json"
    assert main(["--tasks", "arc_easy,nq_open", "--data-dir", str(FIXTURES), "--num-fewshot", "0",
                 "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    arc, nq = report["results"]["arc_easy"], report["results"]["nq_open"]
    assert arc["acc"] >= 0.5 and 0 <= arc["acc_norm"] <= 1  # a real model, not chance on these easy questions
    assert 0 <= nq["exact_match"] <= 1
    assert report["categories"] == {"commonsense_reasoning": arc["acc_norm"], "world_knowledge": nq["exact_match"]}
    assert report["config"]["examples"] == {"arc_easy": 4, "nq_open": 3}
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    table = capsys.readouterr().out
    assert "arc_easy" in table and "World Knowledge" in table


def test_engine_log_likelihood_equals_generate_scoring(backend):
    tok = backend.tokenizer
    context, continuation = "Question: What do bees make?\nAnswer:", " honey"
    [ours] = backend.loglikelihood([(context, continuation)])
    _, logprobs = mistral7b.generate([tok.encode(context + continuation)], backend.model, max_tokens=0)
    n = len(tok.encode(context + continuation)) - len(tok.encode(context))
    assert ours == pytest.approx(sum(logprobs[0][-n:]), abs=1e-4)


def test_generation_stops_before_its_stop_strings(backend):
    [[text]] = backend.generate(["Q: what is the capital of france?\nA:"], Sampling(max_tokens=16, stop=("\n", ".")))
    assert text and "\n" not in text and "." not in text


def test_maj_at_k_draws_k_different_samples_reproducibly(backend):
    prompt = ["Question: Tom has 3 apples and buys 4 more. How many apples does he have?\nAnswer:"]
    how = Sampling(max_tokens=8, n=8, temperature=1.0, seed=7)
    [first] = backend.generate(prompt, how)
    assert len(first) == 8 and len(set(first)) > 1  # not eight copies of one seed
    assert backend.generate(prompt, how) == [first]  # seed + i per sample: reproducible


def test_two_models_side_by_side(tmp_path, capsys):
    from mistral7b.defaults import default_model_path

    path = str(default_model_path())
    out = tmp_path / "two.json"
    assert main(["--model", path, "--model", path, "--tasks", "boolq", "--data-dir", str(FIXTURES),
                 "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    first, second = report["models"]
    assert report["models"][first]["results"] == report["models"][second]["results"]  # same weights, same scores
    assert second == f"{first} (2)" and capsys.readouterr().out.splitlines()[0].endswith(second)
