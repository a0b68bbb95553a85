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


_NO_TORCH = """
import sys
from mistral7b.cli import main
try:
    main(sys.argv[1:])
except SystemExit as e:
    print("exit", e.code, "torch" in sys.modules)
"""


@pytest.mark.parametrize("args", [["--help"], ["chat", "--help"], ["serve", "--bogus"], ["eval", "--help"]])
def test_help_and_flag_errors_answer_without_importing_torch(args):
    """`import torch` is ~1.5 s: --help, and a mistyped flag, must not wait for it."""
    out = subprocess.run([sys.executable, "-c", _NO_TORCH, *args], capture_output=True, text=True)
    assert out.stdout.splitlines()[-1] == f"exit {2 if '--bogus' in args else 0} False", out.stderr


_CTRL_C_IN_IMPORT = """
import importlib.abc, sys
from mistral7b.cli import main

class CtrlC(importlib.abc.MetaPathFinder):  # the user's Ctrl-C, half-way through `import torch`
    def find_spec(self, name, path=None, target=None):
        if name == "torch.nn.modules.pixelshuffle":
            raise KeyboardInterrupt

sys.meta_path.insert(0, CtrlC())
print("exit", main(["chat"]), "torch" in sys.modules)
"""


def test_ctrl_c_while_torch_imports_is_one_line():
    out = subprocess.run([sys.executable, "-c", _CTRL_C_IN_IMPORT], capture_output=True, text=True)
    assert (out.returncode, out.stdout, out.stderr) == (0, "exit 130 False\n", "\ninterrupted\n")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The default SmolLM2 GGUF converted to a Hugging Face folder by the command."""
    folder = tmp_path_factory.mktemp("converted") / "hf"
    out = run_cli("convert", str(mistral7b.defaults.default_model_path()), str(folder), "--to", "hf")
    assert out.returncode == 0, out.stderr
    return folder


def test_convert_gguf_to_hf_runs_in_transformers(converted):
    """The default SmolLM2 GGUF, converted by the command, gives transformers our logits."""
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()
    ours = mistral7b.load(None)
    ids = torch.tensor(mistral7b.load_tokenizer(None).encode("The history of the Roman Empire began"))
    with torch.no_grad():
        diff = (hf(ids[None]).logits[0] - ours(ids, [len(ids)])).abs().max().item()
    assert diff < 1e-3, diff


# ---- first contact (issue 16): converted folders run, --tokenizer, info numbers, chat, serve, GGUF blocks ----

TEXTS = ["Hi", "Hello world, how are you?", "  two spaces\n\nand lines\tand tabs", "café 😀 中文 1234567"]


def test_converted_gguf_folder_carries_its_tokenizer(converted):
    """convert writes tokenizer.json + tokenizer_config.json: the folder runs in our command and in
    transformers' AutoTokenizer, which encodes text and chats as we do."""
    from transformers import AutoTokenizer

    assert {"tokenizer.json", "tokenizer_config.json"} <= {f.name for f in converted.iterdir()}
    out = run_cli("generate", "--model", str(converted), "Hi", "--max-tokens", "3")
    assert out.returncode == 0, out.stderr
    ours, theirs = mistral7b.load_tokenizer(None), AutoTokenizer.from_pretrained(converted)
    for text in TEXTS:
        assert theirs(text)["input_ids"] == ours.encode(text, bos=ours.add_bos), text
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    rendered = theirs.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
    assert list(rendered["input_ids"] if hasattr(rendered, "keys") else rendered) == ours.encode_chat(chat)


def test_tokenizer_flag_runs_a_folder_without_one(converted, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).hardlink_to(converted / name)
    missing = run_cli("generate", "--model", str(bare), "Hi", "--max-tokens", "3")
    assert missing.returncode == 2 and "--tokenizer PATH" in missing.stderr
    expected = run_cli("generate", "--model", str(converted), "Hi", "--max-tokens", "3")
    given = run_cli("generate", "--model", str(bare), "--tokenizer", str(converted), "Hi", "--max-tokens", "3")
    assert given.returncode == 0, given.stderr
    assert given.stdout == expected.stdout and given.stdout.strip()
    # convert: a source without a tokenizer says so; --tokenizer puts one in
    plain = run_cli("convert", str(bare), str(tmp_path / "plain"), "--to", "reference")
    assert plain.returncode == 0 and "no tokenizer" in plain.stderr and "--tokenizer" in plain.stderr
    out = run_cli("convert", str(bare), str(tmp_path / "ref"), "--to", "reference",
                  "--tokenizer", str(mistral7b.defaults.default_model_path()))
    assert out.returncode == 0, out.stderr
    assert mistral7b.load_tokenizer(tmp_path / "ref").encode("Hello world") == mistral7b.load_tokenizer(None).encode(
        "Hello world")
    bad = run_cli("convert", str(bare), str(tmp_path / "bad"), "--to", "hf", "--tokenizer", str(tmp_path / "nope"))
    assert bad.returncode == 2 and "no such file" in bad.stderr and not (tmp_path / "bad").exists()


def test_every_model_command_takes_tokenizer():
    for command in ("generate", "chat", "serve", "eval", "finetune", "merge", "convert"):
        assert "--tokenizer" in run_cli(command, "--help").stdout, command


def test_info_json_gives_numbers():
    path = mistral7b.defaults.default_model_path()
    info = json.loads(run_cli("info", "--json").stdout)
    assert info["parameters"] == 134515008 and info["size_on_disk"] == path.stat().st_size
    assert (info["heads"], info["kv_heads"], info["head_dim"], info["sliding_window"]) == (9, 3, 64, None)
    table = run_cli("info").stdout
    assert "134.5M" in table and "93.8 MiB" in table and "none (full attention)" in table


def test_chat_header_names_the_model_and_ctrl_d_ends_the_line():
    import os
    import pty

    master, slave = pty.openpty()  # stdin a terminal: the interactive prompt
    proc = subprocess.Popen([sys.executable, "-m", "mistral7b", "chat"], stdin=slave, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    os.close(slave)
    os.write(master, b"\x04")  # Ctrl-D at the first prompt
    try:
        out, err = proc.communicate(timeout=300)
    finally:
        os.close(master)
    assert proc.returncode == 0, err
    assert "Chatting with SmolLM2-135M-Instruct (int4/int8 weights, fp32 activations, context 8192 tokens, cpu)." in err
    assert err.endswith("> \n")


def test_serve_on_a_busy_port_fails_first_in_one_line():
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = run_cli("serve", "--port", str(port), timeout=120)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("error: ") and len(out.stderr.strip().splitlines()) == 1
    assert f"127.0.0.1:{port}" in out.stderr and "in use" in out.stderr and "serving" not in out.stderr


def test_quantized_gguf_runs_its_own_blocks_by_default():
    """No flags: the Q4_1 file's blocks (as --quantize int4); --dtype fp32 dequantizes."""
    tokenizer = mistral7b.load_tokenizer(None)
    prompt = "What is the capital of France?"  # fp32 answers Paris, the Q4_1 blocks a list of French words
    ids = tokenizer.encode_chat([{"role": "user", "content": prompt}])
    expected = {name: mistral7b.generate([ids], model, max_tokens=8)[0][0] for name, model in
                (("int4", mistral7b.load(None, quantize="int4")), ("fp32", mistral7b.load(None)))}
    assert expected["int4"] != expected["fp32"]  # the prompt tells the two apart
    for flags, name in (([], "int4"), (["--dtype", "fp32"], "fp32")):
        out = run_cli("generate", "--chat", prompt, "--max-tokens", "8", "--output-ids", *flags)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip().splitlines()[-1] == ",".join(map(str, expected[name])), flags
