"""A whole tool loop against `mistral7b serve`, with the official `openai` client: the model calls a
function, we run it, send the result back, and the model answers with it.

    mistral7b serve &                       # the default model (or --model a Mistral 7B Instruct v0.3)
    python examples/tool_loop.py "What is the weather like in Paris?"
"""

from __future__ import annotations

import json
import sys
from typing import Callable

import openai


def get_weather(city: str, unit: str = "celsius") -> str:
    """Stands for a real weather API."""
    return json.dumps({"city": city, "temperature": 22 if unit == "celsius" else 72, "unit": unit, "sky": "sunny"})


TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"]}}}]
FUNCTIONS: dict[str, Callable[..., str]] = {"get_weather": get_weather}


def tool_loop(client: openai.OpenAI, model: str, question: str, *, tools: list[dict] = TOOLS,
              functions: dict[str, Callable[..., str]] = FUNCTIONS, first_choice="required",
              max_rounds: int = 4) -> tuple[str, list[dict]]:
    """-> (the final answer, the whole conversation). The first turn must call a tool (`first_choice`),
    later ones may; every call is run and its result sent back as a `tool` message."""
    messages: list[dict] = [{"role": "user", "content": question}]
    for round in range(max_rounds):
        choice = client.chat.completions.create(
            model=model, messages=messages, tools=tools, tool_choice=first_choice if round == 0 else "auto",
            temperature=0, max_tokens=128).choices[0]
        calls = choice.message.tool_calls or []
        messages.append({"role": "assistant", "content": choice.message.content,
                         "tool_calls": [c.model_dump(include={"id", "type", "function"}) for c in calls] or None})
        if not calls:
            return choice.message.content or "", messages
        for call in calls:
            result = functions[call.function.name](**json.loads(call.function.arguments))
            messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
    final = client.chat.completions.create(model=model, messages=messages, tools=tools, tool_choice="none",
                                           temperature=0, max_tokens=128).choices[0]
    return final.message.content or "", messages


if __name__ == "__main__":
    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
    model = client.models.list().data[0].id
    answer, conversation = tool_loop(client, model, " ".join(sys.argv[1:]) or "What is the weather like in Paris?")
    for message in conversation:
        print(f"{message['role']:>9}: {message.get('content') or json.dumps(message.get('tool_calls'))}")
    print(f"   answer: {answer}")
