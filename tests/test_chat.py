"""Chat with the real default model (SmolLM2-135M-Instruct): the command as a user drives it, the
session's kept cache, and the same greedy answers through every path."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

import mistral7b
from mistral7b.chat import ChatSession
from mistral7b.sampling import SamplingParams

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def default():
    return mistral7b.load(None), mistral7b.load_tokenizer(None)


def library_answer(model, tok, messages, max_tokens=40) -> str:
    prompt = tok.encode_chat(messages)
    tokens, _ = mistral7b.generate([prompt], model, max_tokens=max_tokens, eos_id=None)
    answer = []
    for t in tokens[0]:
        if t in tok.stop_ids:
            break
        answer.append(t)
    return tok.decode(answer)


def test_answers_are_coherent_and_equal_across_paths(default):
    model, tok = default
    expected = library_answer(model, tok, [{"role": "user", "content": QUESTION}])
    assert "Paris" in expected
    cli = subprocess.run([sys.executable, "-m", "mistral7b", "generate", "--chat", QUESTION, "--max-tokens", "40",
                          "--dtype", "fp32"],
                         capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.strip() == expected.strip()
    session = ChatSession(model, tok, SamplingParams(max_tokens=40))
    assert "".join(session.send(QUESTION)).strip() == expected.strip()


def test_session_feeds_only_new_tokens_and_matches_fresh_encoding(default):
    model, tok = default
    session = ChatSession(model, tok, SamplingParams(max_tokens=30), system="You are a helpful assistant.")
    first = "".join(session.send("Name a primary color."))
    fed_after_first = list(session.fed)
    second = "".join(session.send("Name another one."))
    conversation = tok.encode_chat(session.messages[:-1])  # system, user, assistant, user
    # The second turn reused the first turn's cache: only the tokens after it were fed.
    assert session.last.request.prompt == conversation[len(fed_after_first):]
    assert len(session.last.request.prompt) < len(conversation) // 2
    # And the answer equals a fresh, whole-conversation run.
    assert second == library_answer(model, tok, session.messages[:-1], max_tokens=30)
    assert first and second


def test_chat_command_with_piped_stdin(tmp_path):
    script = f"{QUESTION}\n/reset\n{QUESTION}\n/exit\nnever read\n"
    out = subprocess.run([sys.executable, "-m", "mistral7b", "chat", "--max-tokens", "40", "--dtype", "fp32"],
                         input=script, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    answers = [line for line in out.stdout.splitlines() if line.strip()]
    assert len(answers) == 2 and answers[0] == answers[1] and "Paris" in answers[0]
    assert "conversation reset" in out.stderr and out.stderr.count("tok/s") == 2
    assert "Traceback" not in out.stderr


def test_ctrl_c_stops_the_answer_not_the_program():
    # SIGINT as a terminal gives it: a runner started in the background (`cmd &` in a script) passes
    # SIGINT on as ignored, and Python then installs no KeyboardInterrupt handler.
    proc = subprocess.Popen([sys.executable, "-m", "mistral7b", "chat", "--max-tokens", "300", "--dtype", "fp32"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=0,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    proc.stdin.write("Tell me a very long story about a dragon.\n")
    proc.stdin.flush()
    assert proc.stdout.read(1)  # the answer has started streaming
    proc.send_signal(signal.SIGINT)
    proc.stdin.write(f"{QUESTION}\n/exit\n")
    proc.stdin.flush()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "[stopped]" in out and "Paris" in out.split("[stopped]", 1)[1]
    assert "Traceback" not in err
