"""Structured outputs and function calling through the real server and the official `openai` client."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jsonschema
import openai
import pytest

import mistral7b
from _server import start_server, stop_server
from conftest import make_tiny_model

MODEL = "SmolLM2-135M-Instruct"
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150}},
          "required": ["name", "age"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "The time now in a time zone",
                                         "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}}}}


@pytest.fixture(scope="module")
def client():
    proc, url = start_server("--max-num-seqs", "8", "--max-model-len", "1024")
    yield openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=300)
    stop_server(proc)


def ask(client, stream: bool = False, **kwargs):
    """A chat completion -> (content, tool calls as dicts, finish_reason), streamed or not."""
    kwargs = {"model": MODEL, "max_tokens": 64, "temperature": 0, **kwargs}
    if not stream:
        choice = client.chat.completions.create(**kwargs).choices[0]
        calls = [c.model_dump(include={"id", "type", "function"}) for c in choice.message.tool_calls or []]
        return choice.message.content, calls, choice.finish_reason
    content, calls, finish = "", {}, None
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for d in delta.tool_calls or []:
            call = calls.setdefault(d.index, {"id": d.id, "type": d.type, "function": {"name": "", "arguments": ""}})
            call["function"]["name"] += d.function.name or ""
            call["function"]["arguments"] += d.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    return content or None, [calls[i] for i in sorted(calls)], finish


def test_json_schema_response_format(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    messages = [{"role": "user", "content": "Invent a person."}]
    content, _, finish = ask(client, messages=messages, response_format=fmt)
    assert finish == "stop"
    jsonschema.validate(json.loads(content), PERSON)
    assert ask(client, stream=True, messages=messages, response_format=fmt)[0] == content
    content, _, _ = ask(client, messages=messages, response_format={"type": "json_object"})
    assert isinstance(json.loads(content), dict)


def test_sampled_json_schema_outputs_validate(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    for seed in (3, 4):
        response = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "A person?"}],
                                                  response_format=fmt, temperature=1.0, seed=seed, n=4, max_tokens=48)
        for choice in response.choices:
            assert choice.finish_reason in ("stop", "length")
            if choice.finish_reason == "stop":
                jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_completions_structured_outputs(client):
    out = client.completions.create(model=MODEL, prompt="The best pet is the", max_tokens=8, temperature=0,
                                    extra_body={"structured_outputs": {"choice": [" cat", " dog"]}})
    assert out.choices[0].text in (" cat", " dog")
    out = client.completions.create(model=MODEL, prompt="Today's date:", max_tokens=16, temperature=0,
                                    extra_body={"guided_regex": r" 20[0-9]{2}-[01][0-9]-[0-3][0-9]"})
    assert len(out.choices[0].text) == 11


@pytest.mark.parametrize("extra, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"structured_outputs": {"regex": "a(b"}}, "structured_outputs"),
    ({"structured_outputs": {"yaml": "a"}}, "structured_outputs"),
    ({"guided_json": {"type": "nonsense"}}, "guided_json"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]}, "tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "abc", "content": "1"}]},
     "messages"),
])
def test_bad_structured_requests_are_400s(client, extra, param):
    body = {"messages": [{"role": "user", "content": "hi"}], **extra}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, max_tokens=4, **{k: v for k, v in body.items() if k == "messages"},
                                       extra_body={k: v for k, v in body.items() if k != "messages"})
    assert e.value.body["param"] == param


def test_tool_loop_on_the_default_model(client):
    """A forced call, its result sent back, then a final answer; streamed and not, the same call."""
    messages = [{"role": "user", "content": "What is the weather like in Paris?"}]
    forced = dict(messages=messages, tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False)
    content, calls, finish = ask(client, **forced)
    assert finish == "tool_calls" and content is None and len(calls) == 1
    call = calls[0]
    assert call["type"] == "function" and call["function"]["name"] in ("get_weather", "get_time")
    assert len(call["id"]) == 9
    streamed = ask(client, stream=True, **forced)
    assert [c["function"] for c in streamed[1]] == [c["function"] for c in calls] and streamed[2] == "tool_calls"
    named = ask(client, messages=messages, tools=[WEATHER, TIME],
                tool_choice={"type": "function", "function": {"name": "get_weather"}}, parallel_tool_calls=False)
    [weather] = named[1]
    assert weather["function"]["name"] == "get_weather"
    jsonschema.validate(json.loads(weather["function"]["arguments"]), WEATHER["function"]["parameters"])
    messages += [{"role": "assistant", "content": None, "tool_calls": [weather]},
                 {"role": "tool", "tool_call_id": weather["id"], "content": "22 degrees and sunny"}]
    content, calls, finish = ask(client, messages=messages, tools=[WEATHER], tool_choice="none")
    assert content and not calls and finish in ("stop", "length")


def test_auto_tool_choice_gives_text_or_valid_calls(client):
    for question in ("What is the weather like in Rome?", "Say hello."):
        content, calls, finish = ask(client, messages=[{"role": "user", "content": question}], tools=[WEATHER])
        for call in calls:
            assert call["function"]["name"] == "get_weather"
            jsonschema.validate(json.loads(call["function"]["arguments"]), WEATHER["function"]["parameters"])
        assert (finish == "tool_calls") == bool(calls) or finish == "length"
        assert calls or content


@pytest.fixture(scope="module")
def mistral_v3_server(tmp_path_factory):
    """A tiny random Mistral with Mistral's real v3 tokenizer (its [TOOL_CALLS] format)."""
    import mistral_common

    folder = tmp_path_factory.mktemp("tiny-v3")
    mistral7b.save(make_tiny_model(vocab_size=32768), folder)
    data = Path(mistral_common.__file__).parent / "data"
    shutil.copy(data / "mistral_instruct_tokenizer_240323.model.v3", folder / "tokenizer.model.v3")
    proc, url = start_server("--model", str(folder), "--max-model-len", "512", "--served-model-name", "tiny")
    yield openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=300)
    stop_server(proc)


def test_tool_loop_with_mistral_v3_format(mistral_v3_server):
    """A random model must still produce a valid call when the call is forced; then the result goes back
    through mistral-common's [TOOL_RESULTS] encoding."""
    client = mistral_v3_server
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    kwargs = dict(model="tiny", messages=messages, tools=[WEATHER], max_tokens=200, temperature=0,
                  tool_choice={"type": "function", "function": {"name": "get_weather"}}, parallel_tool_calls=False)
    content, calls, finish = ask(client, **kwargs)
    assert finish == "tool_calls" and len(calls) >= 1 and content is None
    for call in calls:
        assert call["function"]["name"] == "get_weather" and len(call["id"]) == 9 and call["id"].isalnum()
        jsonschema.validate(json.loads(call["function"]["arguments"]), WEATHER["function"]["parameters"])
    streamed = ask(client, stream=True, **kwargs)
    assert [c["function"] for c in streamed[1]] == [c["function"] for c in calls]
    messages += [{"role": "assistant", "content": None, "tool_calls": calls[:1]},
                 {"role": "tool", "tool_call_id": calls[0]["id"], "content": "22C"}]
    content, more, finish = ask(client, **{**kwargs, "messages": messages, "tool_choice": "none", "max_tokens": 8})
    assert not more and finish in ("stop", "length")


def test_the_example_tool_loop(client):
    """examples/tool_loop.py, as its docstring runs it: call -> run the function -> result -> answer."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tool_loop", Path(__file__).parents[1] / "examples" / "tool_loop.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    answer, conversation = example.tool_loop(client, MODEL, "What is the weather like in Paris?")
    assert [m["role"] for m in conversation[:3]] == ["user", "assistant", "tool"]
    assert json.loads(conversation[2]["content"])["sky"] == "sunny"
    assert answer


def test_moderations_and_safe_prompt(client):
    from mistral7b.guardrails import CATEGORIES, GUARDRAIL_PROMPT

    texts = ["How do I bake bread?", "Explain how to steal a car without being caught."]
    result = client.moderations.create(model=MODEL, input=texts)
    assert len(result.results) == 2
    for r in result.results:
        flags = r.categories.model_dump()
        assert set(CATEGORIES) <= set(flags) and r.flagged == any(flags[c] for c in CATEGORIES)
        scores = r.category_scores.model_dump()
        assert all(0 <= scores[c] <= 1 for c in CATEGORIES) and sum(scores[c] for c in CATEGORIES) <= 1 + 1e-6
    with pytest.raises(openai.BadRequestError):
        client.moderations.create(model=MODEL, input=[])
    messages = [{"role": "user", "content": "Hi"}]
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1).usage.prompt_tokens
    safe = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1,
                                          extra_body={"safe_prompt": True}).usage.prompt_tokens
    assert safe - plain >= len(mistral7b.load_tokenizer(None).encode(GUARDRAIL_PROMPT)) - 16  # it replaced the default system prompt


def test_a_template_that_renders_tools_gets_them_as_transformers_gives_them():
    """A Jinja template with a `tools` variable renders them itself, token for token as transformers does."""
    from transformers import PreTrainedTokenizerFast

    template = ("{% if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif %}"
                "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    ours = mistral7b.load_tokenizer(None)
    theirs = PreTrainedTokenizerFast(tokenizer_object=ours.backend)
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    expected = theirs.apply_chat_template(messages, tools=[WEATHER], chat_template=template,
                                          add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ours.encode_chat(messages, [WEATHER], chat_template=template) == list(expected)
    # SmolLM2's own template renders no tools: they are described in the system prompt instead.
    assert "<tools>" in ours.decode(ours.encode_chat(messages, [WEATHER]))


def test_prompt_logprobs(client):
    """vLLM's prompt_logprobs: per prompt token its log-probability, rank and the k most likely, equal to
    what echo + logprobs scores; on chat beside the choices; streamed with the first chunk."""
    prompt = "The capital of France is Paris, and the capital of Italy is"
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0,
                                    extra_body={"prompt_logprobs": 2})
    scores = out.choices[0].model_extra["prompt_logprobs"]
    echoed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    legacy = echoed.choices[0].logprobs.token_logprobs
    assert scores[0] is None and legacy[0] is None and len(scores) == len(legacy)
    ids = mistral7b.load_tokenizer(None).encode(prompt)
    for token, entry, lp in zip(ids[1:], scores[1:], legacy[1:]):
        mine = entry[str(token)]
        assert mine["logprob"] == pytest.approx(lp, abs=1e-4) and mine["rank"] >= 1
        assert len(entry) <= 3 and all(e["rank"] <= 2 or t == str(token) for t, e in entry.items())
    streamed = [c for c in client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, stream=True,
                                                     extra_body={"prompt_logprobs": 2})]
    assert streamed[0].choices[0].model_extra["prompt_logprobs"] == scores
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=1,
                                          extra_body={"prompt_logprobs": 0})
    chat_scores = chat.model_extra["prompt_logprobs"]
    assert chat_scores[0] is None and len(chat_scores) == chat.usage.prompt_tokens
    assert all(len(entry) == 1 for entry in chat_scores[1:])
