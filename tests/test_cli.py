"""The `mistral7b` command, run as a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import mistral7b


def run_cli(*args: str, stdin: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mistral7b", *args], input=stdin, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_folder(tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-ref")
    mistral7b.save(tiny_model, folder)
    return folder


def test_generate_prompt_ids_equals_library(tiny_model, tiny_folder):
    expected, _ = mistral7b.generate([[5, 6, 7, 8, 9]], tiny_model, max_tokens=12)
    out = run_cli("generate", "--model", str(tiny_folder), "--prompt-ids", "5,6,7,8,9", "--max-tokens", "12",
                  "--output-ids", "--chunk-size", "2")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == ",".join(map(str, expected[0]))
    assert "tok/s" in out.stderr


def test_convert_and_info(tiny_folder, tmp_path):
    out = run_cli("convert", str(tiny_folder), str(tmp_path / "hf"), "--to", "hf")
    assert out.returncode == 0, out.stderr
    info = json.loads(run_cli("info", str(tmp_path / "hf"), "--json").stdout)
    assert info["format"] == "hf" and info["sliding_window"] == 4 and info["layers"] == 2
    again = run_cli("convert", str(tiny_folder), str(tmp_path / "hf"), "--to", "hf")
    assert again.returncode == 2 and "not empty" in again.stderr


@pytest.mark.parametrize("args, message", [
    (["generate", "--model", "/nonexistent/model", "--prompt-ids", "1"], "no such file"),
    (["info", "/tmp"], "not a checkpoint"),
    (["generate", "--model", "TINY", "--prompt-ids", "1,x"], "comma-separated integers"),
    (["generate", "--model", "TINY", "--prompt-ids", "1,999"], "outside the vocabulary"),
    (["generate", "--model", "TINY", "--prompt-ids", "1", "--top-p", "0"], "top_p"),
    (["generate", "--model", "TINY", "--prompt-ids", "1", "--device", "cuda"] , "no CUDA device"),
])
def test_user_errors_are_one_sentence(tiny_folder, args, message):
    if "cuda" in args and __import__("torch").cuda.is_available():
        pytest.skip("a CUDA device is present")
    out = run_cli(*[str(tiny_folder) if a == "TINY" else a for a in args])
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_help_explains_every_command():
    out = run_cli("--help")
    for command in ("generate", "chat", "convert", "info"):
        assert command in out.stdout
    gen = run_cli("generate", "--help").stdout
    for flag in ("--temperature", "--top-p", "--top-k", "--max-tokens", "--seed", "--stop", "--chunk-size",
                 "--dtype", "--device", "--chat", "--prompt-ids", "--output-ids", "--model"):
        assert flag in gen


def test_convert_gguf_to_hf_runs_in_transformers(tmp_path):
    """The default SmolLM2 GGUF, converted by the command, gives transformers our logits."""
    import torch
    from transformers import AutoModelForCausalLM

    out = run_cli("convert", str(mistral7b.defaults.default_model_path()), str(tmp_path / "hf"), "--to", "hf")
    assert out.returncode == 0, out.stderr
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ours = mistral7b.load(None)
    ids = torch.tensor(mistral7b.load_tokenizer(None).encode("The history of the Roman Empire began"))
    with torch.no_grad():
        diff = (hf(ids[None]).logits[0] - ours(ids, [len(ids)])).abs().max().item()
    assert diff < 1e-3, diff
