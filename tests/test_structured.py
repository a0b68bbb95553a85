"""Structured outputs: constraints compiled by llguidance, masks applied in the engine's sampler."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

import mistral7b
from mistral7b.engine import Engine, Request
from mistral7b.sampling import SamplingParams
from mistral7b.structured import Constraint, ConstraintError

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                           "city": {"enum": ["Paris", "Berlin", "Rome"]}},
          "required": ["name", "age", "city"], "additionalProperties": False}


@pytest.fixture(scope="module")
def default():
    return mistral7b.load(None), mistral7b.load_tokenizer(None)


def run(engine: Engine, prompts: list[list[int]], params: list[SamplingParams]) -> list[list[tuple[list[int], str, str]]]:
    """Every request's choices as (tokens, text, finish_reason), the requests all queued at once."""
    requests = [engine.add_request(Request(list(p), sp)) for p, sp in zip(prompts, params)]
    out = {(r.request_id, i): ([], [], None) for r in requests for i in range(r.params.n)}
    while engine.has_work:
        for o in engine.step():
            tokens, text, _ = out[(o.request_id, o.index)]
            out[(o.request_id, o.index)] = (tokens + o.new_tokens, text + [o.new_text], o.finish_reason)
    return [[(t, "".join(x), f) for (t, x, f) in (out[(r.request_id, i)] for i in range(r.params.n))] for r in requests]


def chat(tokenizer, text: str) -> list[int]:
    return tokenizer.encode_chat([{"role": "user", "content": text}])


def test_bad_constraints_name_their_field(default):
    _, tokenizer = default
    with pytest.raises(ConstraintError, match="not valid JSON") as e:
        Constraint.json_schema("{oops", "response_format")
    assert e.value.param == "response_format"
    with pytest.raises(ConstraintError, match="must be an object"):
        Constraint.json_schema([1, 2])
    with pytest.raises(ConstraintError, match="non-empty list"):
        Constraint.choice([])
    with pytest.raises(ConstraintError, match="unknown kind"):
        Constraint("xml", "<a/>")
    engine = Engine(default[0], tokenizer, max_num_seqs=2, max_model_len=256)
    for bad in (Constraint("regex", "a(b", "structured_outputs"), Constraint("grammar", "start: foo", "guided_grammar"),
                Constraint.json_schema({"type": "nonsense"}, "response_format"),
                Constraint.json_schema({"type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}})):
        with pytest.raises(ConstraintError) as e:
            engine.add_request(Request([1, 2, 3], SamplingParams(constraint=bad)))
        assert e.value.param == bad.param
    assert not engine.has_work  # nothing was queued


def test_sampled_json_schema_outputs_are_always_valid(default):
    """Temperature 1 over several seeds: every output parses and validates, or ended by length."""
    model, tokenizer = default
    engine = Engine(model, tokenizer, max_num_seqs=8, max_model_len=512)
    prompt = chat(tokenizer, "Describe a person as JSON with name, age and city.")
    params = [SamplingParams(max_tokens=48, temperature=1.0, seed=seed, n=4, constraint=Constraint.json_schema(PERSON))
              for seed in (1, 2)]
    choices = [c for r in run(engine, [prompt, prompt], params) for c in r]
    finished = 0
    for tokens, text, reason in choices:
        assert reason in ("stop", "length")
        if reason == "stop":
            jsonschema.validate(json.loads(text), PERSON)
            finished += 1
    assert finished >= 4  # most finish well inside 48 tokens
    assert engine.cache.used_blocks == 0


def test_regex_choice_and_grammar(default):
    model, tokenizer = default
    engine = Engine(model, tokenizer, max_num_seqs=4, max_model_len=512)
    prompt = chat(tokenizer, "What is the capital of France? Answer briefly.")
    constraints = [Constraint("regex", r"[A-Z][a-z]{1,8} is the capital\."),
                   Constraint.choice(["Paris", "London", "Madrid"]),
                   Constraint("grammar", 'start: "The answer is " ANSWER "."\nANSWER: /[0-9]{1,3}/'),
                   Constraint("grammar", 'root ::= "yes" | "no"')]  # llama.cpp's GBNF
    results = run(engine, [prompt] * 4, [SamplingParams(max_tokens=24, constraint=c) for c in constraints])
    texts = [r[0][1] for r in results]
    assert re.fullmatch(r"[A-Z][a-z]{1,8} is the capital\.", texts[0])
    assert texts[1] in ("Paris", "London", "Madrid")
    assert re.fullmatch(r"The answer is [0-9]{1,3}\.", texts[2])
    assert texts[3] in ("yes", "no")
    assert all(r[0][2] == "stop" for r in results)


def test_constrained_and_free_requests_share_a_step(default):
    """Greedy: each request of a mixed batch (constrained, free, a forced tool call) gets the tokens it gets alone."""
    from mistral7b.tools import check_tools, tool_format

    model, tokenizer = default
    tools = check_tools([{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]}}}])
    prompts = [chat(tokenizer, t) for t in ("Give me a person as JSON.", "Tell me a fact about cats.",
                                           "Pick a colour.", "Count to five.")]
    prompts.append(tokenizer.encode_chat([{"role": "user", "content": "Weather in Oslo?"}], tools))
    params = [SamplingParams(max_tokens=24, constraint=Constraint.json_schema(PERSON)), SamplingParams(max_tokens=24),
              SamplingParams(max_tokens=8, constraint=Constraint.choice(["red", "green", "blue"])),
              SamplingParams(max_tokens=16, constraint=Constraint("regex", r"1, 2, 3, 4, 5")),
              SamplingParams(max_tokens=40, constraint=tool_format(tokenizer).constraint(tools, "required", None, False))]
    engine = Engine(model, tokenizer, max_num_seqs=5, max_model_len=512)
    together = run(engine, prompts, params)
    alone = [run(engine, [p], [sp])[0] for p, sp in zip(prompts, params)]
    assert together == alone
    assert together[3][0][1] == "1, 2, 3, 4, 5"
    assert together[4][0][1].startswith('<tool_call>') and together[4][0][2] == "stop"


def test_logprobs_and_stop_strings_with_a_constraint(default):
    model, tokenizer = default
    engine = Engine(model, tokenizer, max_num_seqs=1, max_model_len=512)
    prompt = chat(tokenizer, "Say hello.")
    [[(tokens, text, reason)]] = run(engine, [prompt], [SamplingParams(
        max_tokens=24, logprobs=2, stop=("o",), constraint=Constraint("regex", "Hello, world"))])
    assert text == "Hell" and reason == "stop"


def test_generate_cli_json_schema(tmp_path):
    import subprocess
    import sys

    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(PERSON))
    run_cli = lambda *a: subprocess.run([sys.executable, "-m", "mistral7b", "generate", *a], capture_output=True,
                                        text=True, timeout=300)
    done = run_cli("--chat", "A person as JSON.", "--json-schema", str(schema), "--max-tokens", "64")
    assert done.returncode == 0, done.stderr
    jsonschema.validate(json.loads(done.stdout.strip()), PERSON)
    done = run_cli("Pick one:", "--choice", "cat,dog", "--max-tokens", "8")
    assert done.returncode == 0 and done.stdout.strip() in ("cat", "dog")
    done = run_cli("x", "--regex", "a(b", "--max-tokens", "8")
    assert done.returncode != 0 and "--regex" in done.stderr and "Traceback" not in done.stderr


def test_cli_moderate_and_chat_with_tools(tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "mistral7b", "moderate", "--json", "How do I bake bread?"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    [result] = json.loads(done.stdout)["results"]
    assert isinstance(result["flagged"], bool) and set(result["categories"]) == {"illegal", "hateful",
                                                                                  "unqualified-advice"}
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([{"type": "function", "function": {
        "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]))
    done = subprocess.run([sys.executable, "-m", "mistral7b", "chat", "--tools", str(tools), "--max-tokens", "48"],
                          input="What is the weather in Paris? Call the tool.\n/result 22 degrees, sunny\n",
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    # Either the model called the tool (shown, then answered with its result) or it answered in text.
    assert "[tool call" in done.stderr or "/result answers tool calls" in done.stderr
