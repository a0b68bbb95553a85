"""Tensor parallelism on 2 gloo processes started by torchrun: logits, greedy tokens and the HTTP
server equal the single-process run on tiny windowed models, in every checkpoint format."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType as Q

import mistral7b
from _parallel_worker import scenario
from mistral7b.cli import main
from mistral7b.errors import ConfigError
from mistral7b.parallel import Shard, possible_sizes
from test_gguf import model_state, write_gguf

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
WORKER = Path(__file__).with_name("_parallel_worker.py")


def random_model(seed: int = 0, **changes) -> mistral7b.Transformer:
    torch.manual_seed(seed)
    # W=4; 131 tokens split 66 + 65 over two ranks (an uneven vocabulary block).
    args = dict(dim=64, n_layers=2, head_dim=16, hidden_dim=128, n_heads=4, n_kv_heads=2, norm_eps=1e-5,
                vocab_size=131, sliding_window=4)
    model = mistral7b.Transformer(mistral7b.ModelArgs(**{**args, **changes})).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.1)
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> list[Path]:
    """The same kind of model as a reference folder, an HF folder (q/k permuted per head), a .pth
    and a Q8_0 GGUF with tied embeddings, whose w2 shards cut through quantization blocks."""
    root = tmp_path_factory.mktemp("tp")
    model = random_model()
    mistral7b.save(model, root / "ref", "reference")
    mistral7b.save(model, root / "hf", "hf")
    (root / "pth").mkdir()
    (root / "pth" / "params.json").write_text((root / "ref" / "params.json").read_text())
    torch.save(model.state_dict(), root / "pth" / "consolidated.00.pth")
    tied = random_model(seed=1, hidden_dim=96, tied_embeddings=True)  # w2 columns 48 per rank, blocks of 32
    write_gguf(root / "q8.gguf", model_state(tied, Q.Q8_0), tied.args)
    return [root / "ref", root / "hf", root / "pth", root / "q8.gguf"]


def run(cmd: list[str], timeout: int = 120) -> subprocess.CompletedProcess:
    """Run a command in its own process group, all of which a timeout kills (torchrun's ranks too)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_logits_and_generate_equal_one_process(checkpoints, tmp_path):
    out = tmp_path / "results.pt"
    done = run([*TORCHRUN, str(WORKER), str(out), *map(str, checkpoints)])
    assert done.returncode == 0, done.stderr
    results = torch.load(out)
    for path in checkpoints:
        with torch.inference_mode():
            expected = scenario(mistral7b.load(path))
        for key, value in expected.items():
            got = results[str(path)][key]
            assert got.shape == value.shape, (path.name, key)
            if key == "generated":
                assert torch.equal(got, value), path.name
            else:
                torch.testing.assert_close(got, value, atol=1e-5, rtol=0, msg=f"{path.name} {key}")


def our_traceback(output: str) -> bool:
    """Whether a mistral7b process printed a traceback (torchrun adds its own report of a rank's
    non-zero exit or of a signal: that one is not ours)."""
    return re.search(r'File ".*/mistral7b/', output) is not None or "[rank" in output


def test_generate_command_equals_one_process(checkpoints, capsys):
    flags = ["generate", "--model", str(checkpoints[1]), "--prompt-ids", "1,5,9,23,44,2,7,8,100,3",
             "--max-tokens", "12", "--output-ids"]
    split = run([*TORCHRUN, "-m", "mistral7b", *flags, "--tp", "2"])
    assert split.returncode == 0 and not our_traceback(split.stderr), split.stderr
    assert main(flags) == 0
    ids = capsys.readouterr().out.strip().splitlines()[-1]
    assert len(ids.split(",")) == 12 and split.stdout.strip().splitlines()[-1] == ids


@pytest.fixture(scope="module")
def served_model(tmp_path_factory) -> Path:
    """A random windowed model with SmolLM2's vocabulary and tokenizer (text and chat)."""
    from mistral7b.train.outputs import save_tokenizer

    folder = tmp_path_factory.mktemp("served")
    mistral7b.save(random_model(vocab_size=49152), folder, "reference")
    save_tokenizer(None, folder)
    return folder


@pytest.fixture(scope="module")
def servers(served_model):
    """(one-process URL, two-rank URL) of `mistral7b serve` on the same model, started together."""
    from concurrent.futures import ThreadPoolExecutor

    from _server import start_server, stop_server

    flags = ("--model", str(served_model), "--max-num-seqs", "4")
    with ThreadPoolExecutor(2) as pool:
        whole = pool.submit(start_server, *flags)
        split = pool.submit(start_server, *flags, "--tp", "2", command=(*TORCHRUN, "-m", "mistral7b"))
        (whole_proc, whole_url), (split_proc, split_url) = whole.result(), split.result()
    yield whole_url, split_url
    stop_server(whole_proc)
    stop_server(split_proc)
    assert split_proc.returncode is not None and not our_traceback(split_proc.stdout.read())


def test_server_answers_equal_one_process(servers):
    import openai

    answers = []
    for url in servers:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
        model = client.models.list().data[0].id
        batch = client.completions.create(model=model, prompt=["Once upon a time", "The capital of", "def f(x):"],
                                          max_tokens=16, temperature=0, logprobs=2)
        chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hello there"}],
                                              max_tokens=16, temperature=0, stream=True)
        answers.append(([c.text for c in batch.choices], [c.logprobs.token_logprobs for c in batch.choices],
                        "".join(chunk.choices[0].delta.content or "" for chunk in chat if chunk.choices)))
    (texts, logprobs, chat), (split_texts, split_logprobs, split_chat) = answers
    assert split_texts == texts and split_chat == chat and all(texts) and chat
    torch.testing.assert_close(torch.tensor(split_logprobs), torch.tensor(logprobs), atol=1e-4, rtol=0)


def test_errors_are_one_line(checkpoints, capsys):
    assert main(["generate", "--tp", "2", "--model", str(checkpoints[0]), "--prompt-ids", "1,2"]) == 2
    assert capsys.readouterr().err == ("error: --tp 2 splits the model over 2 processes; start them with torchrun: "
                                       "torchrun --nproc-per-node 2 -m mistral7b ... --tp 2\n")
    # One key/value head cannot be split over two ranks: rank 0 says so once, no traceback.
    folder = checkpoints[0].parent / "mqa"
    mistral7b.save(random_model(n_kv_heads=1), folder, "reference")
    done = run([*TORCHRUN, "-m", "mistral7b", "generate", "--tp", "2", "--model", str(folder), "--prompt-ids", "1,2"])
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode != 0 and not our_traceback(done.stderr)
    assert errors == ["error: --tp 2: this model's 4 attention heads, 1 key/value heads and 128 feed-forward "
                      "columns do not split evenly over 2 ranks; possible --tp values: 1"]


def test_possible_sizes():
    smollm2 = mistral7b.ModelArgs(dim=576, n_layers=30, head_dim=64, hidden_dim=1536, n_heads=9, n_kv_heads=3,
                                  norm_eps=1e-5, vocab_size=49152)
    assert possible_sizes(smollm2) == [1, 3]
    assert possible_sizes(mistral7b.PRESETS["mistral-7b-v0.1"]) == [1, 2, 4, 8]
    with pytest.raises(ConfigError, match="possible --tp values: 1, 3"):
        Shard(0, 2).local_args(smollm2)
