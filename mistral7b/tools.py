"""Function calling (OpenAI `tools` semantics): the tool list and `tool_choice` checked, the model's own
tool-call format chosen from its tokenizer, calls enforced by a grammar, and the output parsed back.

Two formats:
- **Mistral** (tokenizers with a `[TOOL_CALLS]` control token: Mistral 7B Instruct v0.3 and later): the
  prompt is mistral-common's (`[AVAILABLE_TOOLS]`, `[TOOL_RESULTS]`), and a call is `[TOOL_CALLS]` then a
  JSON list `[{"name": ..., "arguments": {...}}]`.
- **Tags** (every other chat template): `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks,
  the format of Hermes-style templates. A template that renders `tools` itself gets them; one that
  does not (SmolLM2's ChatML) gets them described in the system prompt (`describe_tools`).

`tool_choice` "required" or a named function constrains decoding to valid calls of the allowed
functions, their arguments valid against the `parameters` schema; "auto" lets the model choose
between text and calls, and a call it starts is constrained the same way; "none" sends no tools.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from dataclasses import dataclass

from .errors import InputError
from .structured import Constraint

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")


class ToolError(InputError):
    """A bad `tools`, `tool_choice` or tool message; `param` names the field."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str = ""

    def __post_init__(self) -> None:
        self.id = self.id or new_call_id()

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def new_call_id() -> str:
    """9 letters and digits: what Mistral's v3 format requires (and any client accepts)."""
    return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))


def check_tools(tools: list) -> list[dict]:
    """OpenAI's tool list -> the same, checked: type "function", a name, an object `parameters` schema."""
    checked = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(fn, dict):
            raise ToolError("tools", f"tools.{i}: a tool is {{\"type\": \"function\", \"function\": {{...}}}}")
        if not isinstance(fn.get("name"), str) or not _NAME.fullmatch(fn["name"]):
            raise ToolError("tools", f"tools.{i}.function.name must be 1-64 letters, digits, '_' or '-'")
        parameters = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
            raise ToolError("tools", f"tools.{i}.function.parameters must be a JSON schema of type object")
        checked.append({"type": "function", "function": {**fn, "parameters": parameters}})
    names = [t["function"]["name"] for t in checked]
    if len(set(names)) != len(names):
        raise ToolError("tools", "tools: function names must be unique")
    return checked


def check_tool_choice(choice, tools: list[dict]) -> tuple[str, str | None]:
    """-> (mode, function name): mode "none", "auto" or "required" (a named function is "required" of it)."""
    if choice is None:
        return ("auto" if tools else "none"), None
    if choice in ("none", "auto", "required"):
        if choice == "required" and not tools:
            raise ToolError("tool_choice", "tool_choice 'required' needs tools")
        return choice, None
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if not isinstance(name, str):
        raise ToolError("tool_choice", "tool_choice must be 'none', 'auto', 'required' or "
                                       "{\"type\": \"function\", \"function\": {\"name\": ...}}")
    if name not in [t["function"]["name"] for t in tools]:
        raise ToolError("tool_choice", f"tool_choice names function {name!r}, which is not among the tools")
    return "required", name


def check_tool_messages(messages: list[dict]) -> None:
    """Every tool message answers a call an earlier assistant message made."""
    called: set[str] = set()
    for i, message in enumerate(messages):
        for call in message.get("tool_calls") or []:
            if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
                raise ToolError("messages", f"messages.{i}.tool_calls: each call needs a `function`")
            called.add(call.get("id"))
        if message.get("role") == "tool" and message.get("tool_call_id") not in called:
            raise ToolError("messages", f"messages.{i}: tool_call_id {message.get('tool_call_id')!r} matches no "
                                        "earlier tool call")


def _call_schema(tool: dict) -> dict:
    fn = tool["function"]
    return {"type": "object", "properties": {"name": {"const": fn["name"]}, "arguments": fn["parameters"]},
            "required": ["name", "arguments"], "additionalProperties": False}


class ToolFormat:
    """How one model writes tool calls: its grammar (`constraint`) and the parser of its output."""

    def constraint(self, tools: list[dict], mode: str, name: str | None, parallel: bool) -> Constraint | None:
        raise NotImplementedError

    def parser(self) -> ToolCallParser:
        raise NotImplementedError

    @staticmethod
    def _allowed(tools: list[dict], name: str | None) -> dict:
        schemas = [_call_schema(t) for t in tools if name is None or t["function"]["name"] == name]
        return schemas[0] if len(schemas) == 1 else {"anyOf": schemas}


# Free text in "auto" mode: anything that does not contain the opening tag.
_TEXT = r"TEXT: /(.|\n)*/ & ~/(.|\n)*<tool_call>(.|\n)*/"


class MistralFormat(ToolFormat):
    def __init__(self, marker_id: int):
        self.marker_id = marker_id

    def constraint(self, tools, mode, name, parallel):
        if mode == "none":
            return None
        calls = {"type": "array", "items": self._allowed(tools, name), "minItems": 1}
        if not parallel:
            calls["maxItems"] = 1
        call = f'<[{self.marker_id}]> " "? %json {json.dumps(calls)}'  # "▁[" is how Mistral writes it
        lark = f"start: {call}" if mode == "required" else f"start: TEXT | {call}\nTEXT: /(.|\\n)*/"
        return Constraint("lark", lark, "tools")

    def parser(self) -> ToolCallParser:
        return MistralParser(self.marker_id)


class TagFormat(ToolFormat):
    def constraint(self, tools, mode, name, parallel):
        if mode == "none":
            return None
        call = f'call: "{OPEN}" "\\n"? %json {json.dumps(self._allowed(tools, name))} "\\n"? "{CLOSE}"'
        calls = 'call ("\\n"? call)*' if parallel else "call"
        start = f"start: {calls}" if mode == "required" else f"start: TEXT | TEXT {calls}\n{_TEXT}"
        return Constraint("lark", f"{start}\n{call}", "tools")

    def parser(self) -> ToolCallParser:
        return TagParser()


def tool_format(tokenizer) -> ToolFormat:
    marker = tokenizer.special_tokens.get("[TOOL_CALLS]")
    return MistralFormat(marker) if marker is not None else TagFormat()


def describe_tools(tools: list[dict]) -> str:
    """The tools as a system prompt, for chat templates that do not render `tools` themselves."""
    listing = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools)
    return ("You can call functions. Their signatures, as JSON, are between <tools> and </tools>:\n"
            f"<tools>\n{listing}\n</tools>\n"
            "To call one, answer with a JSON object of its name and arguments between the tags "
            f"{OPEN} and {CLOSE}, for example:\n"
            f'{OPEN}\n{{"name": "function_name", "arguments": {{"argument": "value"}}}}\n{CLOSE}')


def inline_tools(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """A conversation with tools, for a chat template that knows nothing of them: the tools described in
    the system prompt, calls written as tags in the assistant's text, results as user turns."""
    out = [dict(m) for m in messages]
    if tools:
        if out and out[0]["role"] == "system":
            out[0]["content"] = f"{out[0]['content'] or ''}\n\n{describe_tools(tools)}".lstrip()
        else:
            out.insert(0, {"role": "system", "content": describe_tools(tools)})
    for m in out:
        if m.get("tool_calls"):
            m["content"] = "\n".join(filter(None, [m.get("content"), tags_for_calls(m.pop("tool_calls"))]))
        elif m["role"] == "tool":
            m.update(role="user", content=f"<tool_response>\n{m.get('content') or ''}\n</tool_response>")
            m.pop("tool_call_id", None)
    return out


def tags_for_calls(calls: list[dict]) -> str:
    """An assistant message's OpenAI tool_calls, written as the Tag format's text."""
    blocks = []
    for call in calls:
        fn = call["function"]
        arguments = fn.get("arguments") or "{}"
        try:
            arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
        except json.JSONDecodeError:
            pass
        blocks.append(f"{OPEN}\n{json.dumps({'name': fn.get('name'), 'arguments': arguments}, ensure_ascii=False)}\n{CLOSE}")
    return "\n".join(blocks)


def _calls_from_json(text: str) -> list[ToolCall] | None:
    """`{"name", "arguments"}` or a list of them -> calls; None when the text is not that."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return None
        arguments = item.get("arguments", {})
        calls.append(ToolCall(item["name"], arguments if isinstance(arguments, str) else json.dumps(arguments,
                                                                                                  ensure_ascii=False)))
    return calls


class ToolCallParser:
    """Splits a streamed output into content and tool calls. `push(tokens, text)` -> (content to show
    now, calls completed now); `finish()` -> the same for whatever was held back."""

    def push(self, tokens: list[int], text: str) -> tuple[str, list[ToolCall]]:
        raise NotImplementedError

    def finish(self) -> tuple[str, list[ToolCall]]:
        raise NotImplementedError


class MistralParser(ToolCallParser):
    """After the `[TOOL_CALLS]` token (which decodes to no text) the rest is one JSON list of calls."""

    def __init__(self, marker_id: int):
        self.marker_id = marker_id
        self.calling = False
        self.held = ""

    def push(self, tokens, text):
        self.calling = self.calling or self.marker_id in tokens
        if self.calling:
            self.held += text
            return "", []
        return text, []

    def finish(self):
        if not self.calling:
            return "", []
        calls = _calls_from_json(self.held.strip())
        return ("", calls) if calls else (self.held, [])


class TagParser(ToolCallParser):
    """Text outside `<tool_call>...</tool_call>` is content; a tail that may be the start of a tag is
    held back until it is known."""

    def __init__(self):
        self.pending = ""
        self.calling = False

    def push(self, tokens, text):
        self.pending += text
        shown, calls = "", []
        while True:
            if not self.calling:
                start = self.pending.find(OPEN)
                if start < 0:
                    keep = _partial_tag(self.pending)
                    shown += self.pending[:len(self.pending) - keep]
                    self.pending = self.pending[len(self.pending) - keep:]
                    return shown, calls
                shown += self.pending[:start]
                self.pending, self.calling = self.pending[start + len(OPEN):], True
            end = self.pending.find(CLOSE)
            if end < 0:
                return shown, calls
            parsed = _calls_from_json(self.pending[:end].strip())
            if parsed is None:  # not a call after all: show it as it was written
                shown += OPEN + self.pending[:end + len(CLOSE)]
            calls += parsed or []
            self.pending, self.calling = self.pending[end + len(CLOSE):], False

    def finish(self):
        text, self.pending = self.pending, ""
        if not self.calling:
            return text, []
        calls = _calls_from_json(text.strip())  # a call cut before its closing tag
        return ("", calls) if calls else (OPEN + text, [])


def _partial_tag(text: str) -> int:
    """Length of the longest end of `text` that begins the opening tag."""
    return next((k for k in range(min(len(OPEN) - 1, len(text)), 0, -1) if OPEN.startswith(text[-k:])), 0)


def split_output(parser: ToolCallParser, tokens: list[int], text: str) -> tuple[str | None, list[ToolCall]]:
    """A whole output -> (content or None when it only called tools, calls)."""
    shown, calls = parser.push(tokens, text)
    rest, more = parser.finish()
    content, calls = shown + rest, calls + more
    return (content if content.strip() or not calls else None), calls
