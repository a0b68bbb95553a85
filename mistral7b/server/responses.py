"""Shaping engine outputs into OpenAI response bodies and stream chunks."""

from __future__ import annotations

import hashlib
import time
import uuid
from typing import AsyncIterator, Callable

from .. import __version__
from ..engine import SequenceOutput, TokenLogprob
from ..tools import ToolCall, ToolCallParser, split_output


def now() -> int:
    return int(time.time())


def system_fingerprint(model_name: str) -> str:
    """OpenAI's `system_fingerprint`: the same for every answer of one version serving one model."""
    return "fp_" + hashlib.sha256(f"mistral7b {__version__} {model_name}".encode()).hexdigest()[:10]


class _Shaper:
    """State shared by both endpoints: ids, token strings, usage accounting."""

    object_name = ""
    id_prefix = ""

    def __init__(self, tokenizer, model_name: str, body):
        self.tokenizer, self.model_name, self.body = tokenizer, model_name, body
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.created = now()
        self.fingerprint = system_fingerprint(model_name)
        self.n = body.n
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self._cached: dict[int, int] = {}  # prompt index -> its tokens found in the prefix cache
        self._names = {v: k for k, v in tokenizer.special_tokens.items()}
        self.stop_ids = set(body.stop_token_ids or ()) | (set() if body.ignore_eos else set(tokenizer.stop_ids))

    def token_text(self, token: int) -> str:
        return self._names.get(token) if token in self._names else self.tokenizer.decode([token])

    def prompt_logprobs(self, prompt: list[int], entries: list[TokenLogprob | None] | None) -> list | None:
        """vLLM's `prompt_logprobs`: per prompt token (None for the first), {token id: {logprob, rank,
        decoded_token}} for the token itself and the `prompt_logprobs` most likely alternatives."""
        if self.body.prompt_logprobs is None:
            return None
        out: list[dict | None] = [None]
        k = self.body.prompt_logprobs
        for token, entry in zip(prompt[1:], (entries or [None])[1:]):
            if entry is None:
                out.append(None)
                continue
            scores = {str(t): {"logprob": lp, "rank": r + 1, "decoded_token": self.token_text(t)}
                      for r, (t, lp) in enumerate(entry.top[:k])}
            scores.setdefault(str(token), {"logprob": entry.logprob, "rank": entry.rank,
                                           "decoded_token": self.token_text(token)})
            out.append(scores)
        return out

    def visible(self, entries: list[TokenLogprob], finish_reason: str | None) -> list[TokenLogprob]:
        """Generated entries without a final stop token (it has no text)."""
        if finish_reason == "stop" and entries and entries[-1].token in self.stop_ids:
            return entries[:-1]
        return entries

    def count(self, prompt: int, out: SequenceOutput) -> None:
        """Usage accounting of one output of the prompt-th prompt."""
        self.completion_tokens += len(out.new_tokens)
        if out.index == 0:  # the n choices of a prompt share it: counted once
            self._cached[prompt] = max(self._cached.get(prompt, 0), out.cached_tokens)

    def usage(self) -> dict:
        usage = {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                 "total_tokens": self.prompt_tokens + self.completion_tokens,
                 "prompt_tokens_details": {"cached_tokens": sum(self._cached.values())}}
        return {**self._head("chunk"), "choices": [], "usage": usage}

    def _head(self, kind: str = "") -> dict:
        name = self.object_name + (".chunk" if kind == "chunk" and self.object_name.startswith("chat") else "")
        return {"id": self.id, "object": name, "created": self.created, "model": self.model_name,
                "system_fingerprint": self.fingerprint}


def _group(outputs: list[SequenceOutput]) -> dict[int, dict]:
    """All outputs of one request -> per choice: tokens, text, logprobs, prompt logprobs, finish."""
    choices: dict[int, dict] = {}
    for out in outputs:
        c = choices.setdefault(out.index, {"tokens": [], "text": "", "logprobs": [], "prompt": None, "finish": None})
        c["tokens"] += out.new_tokens
        c["text"] += out.new_text
        c["logprobs"] += out.new_logprobs
        c["prompt"] = c["prompt"] if out.prompt_logprobs is None else out.prompt_logprobs
        c["finish"] = out.finish_reason or c["finish"]
    return choices


class Completions(_Shaper):
    object_name = "text_completion"
    id_prefix = "cmpl"

    def __init__(self, tokenizer, model_name: str, prompts: list[list[int]], body):
        super().__init__(tokenizer, model_name, body)
        self.prompts = prompts
        self.prompt_tokens = sum(len(p) for p in prompts)
        self.echo, self.k = body.echo, body.logprobs

    def _logprobs(self, entries: list[TokenLogprob | None], tokens: list[int], offset: int) -> dict:
        """The legacy completions logprobs object; `entries[i]` None: no score (the first prompt token)."""
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token, entry in zip(tokens, entries):
            text = self.token_text(token)
            out["tokens"].append(text)
            out["text_offset"].append(offset)
            offset += len(text)
            if entry is None:
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            out["token_logprobs"].append(entry.logprob)
            top = {self.token_text(t): lp for t, lp in entry.top}
            top.setdefault(text, entry.logprob)  # lm-eval expects the actual token among them
            out["top_logprobs"].append(top)
        return out

    def shown(self, entries: list[TokenLogprob], finish_reason: str | None) -> list[TokenLogprob]:
        """The generated entries a choice's logprobs list. With echo, every generated token, a final stop
        token too: a scoring harness sends the prompt with max_tokens=1 and reads the prompt's scores as
        token_logprobs[ctxlen:-1] (lm-eval's local-completions), so hiding a stop token there would
        drop the score of the prompt's last token whenever the model's next token is a stop token."""
        return entries if self.echo else self.visible(entries, finish_reason)

    def _choice_logprobs(self, prompt: list[int], prompt_lps, generated: list[TokenLogprob], with_prompt: bool):
        entries, tokens = [], []
        if with_prompt:
            entries, tokens = list(prompt_lps or [None] * len(prompt)), list(prompt)
        entries += generated
        tokens += [e.token for e in generated]
        return self._logprobs(entries, tokens, 0)

    def response(self, results: list[list[SequenceOutput]]) -> dict:
        choices = []
        for p, outputs in enumerate(results):
            prompt_text = self.tokenizer.decode(self.prompts[p]) if self.echo else ""
            for out in outputs:
                self.count(p, out)
            for j, c in sorted(_group(outputs).items()):
                logprobs = None
                if self.k is not None:
                    logprobs = self._choice_logprobs(self.prompts[p], c["prompt"], self.shown(c["logprobs"], c["finish"]),
                                                     self.echo)
                choices.append({"index": p * self.n + j, "text": prompt_text + c["text"], "logprobs": logprobs,
                                "finish_reason": c["finish"]})
                if self.body.prompt_logprobs is not None:
                    choices[-1]["prompt_logprobs"] = self.prompt_logprobs(self.prompts[p], c["prompt"])
        return {**self._head(), "choices": choices, "usage": self.usage()["usage"]}

    async def stream(self, merged: AsyncIterator[tuple[int, SequenceOutput]]) -> AsyncIterator[dict]:
        started: set[int] = set()
        async for p, out in merged:
            index = p * self.n + out.index
            first = index not in started
            started.add(index)
            self.count(p, out)
            text = (self.tokenizer.decode(self.prompts[p]) if self.echo and first else "") + out.new_text
            logprobs = None
            if self.k is not None:
                logprobs = self._choice_logprobs(self.prompts[p], out.prompt_logprobs,
                                                 self.shown(out.new_logprobs, out.finish_reason), self.echo and first)
            choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": out.finish_reason}
            if out.prompt_logprobs is not None and self.body.prompt_logprobs is not None:
                choice["prompt_logprobs"] = self.prompt_logprobs(self.prompts[p], out.prompt_logprobs)
            if text or out.finish_reason or (logprobs and logprobs["tokens"]) or "prompt_logprobs" in choice:
                yield {**self._head(), "choices": [choice]}


class ChatCompletions(_Shaper):
    object_name = "chat.completion"
    id_prefix = "chatcmpl"

    def __init__(self, tokenizer, model_name: str, prompt: list[int], body,
                 tool_parser: Callable[[], ToolCallParser] | None = None):
        """tool_parser: makes the parser of the model's tool calls, when the request has tools."""
        super().__init__(tokenizer, model_name, body)
        self.prompt, self.prompt_tokens = prompt, len(prompt)
        self.k = (body.top_logprobs or 0) if body.logprobs else None
        self.tool_parser = tool_parser
        self.echo = _echo(body)

    def _logprobs(self, entries: list[TokenLogprob]) -> dict:
        def item(token: int, logprob: float) -> dict:
            text = self.token_text(token)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        return {"content": [{**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
                            for e in entries]}

    def response(self, results: list[list[SequenceOutput]]) -> dict:
        [outputs] = results  # one request: the conversation
        for out in outputs:
            self.count(0, out)
        choices = []
        for j, c in sorted(_group(outputs).items()):
            logprobs = self._logprobs(self.visible(c["logprobs"], c["finish"])) if self.k is not None else None
            message, finish = {"role": "assistant", "content": self.echo + c["text"]}, c["finish"]
            if self.tool_parser is not None:
                content, calls = split_output(self.tool_parser(), c["tokens"], c["text"])
                message["content"] = self.echo + (content or "") if content is not None or self.echo else None
                if calls:
                    message["tool_calls"] = [call.to_openai() for call in calls]
                    finish = _tool_finish(finish)
            choices.append({"index": j, "message": message, "logprobs": logprobs, "finish_reason": finish})
        body = {**self._head(), "choices": choices, "usage": self.usage()["usage"]}
        if self.body.prompt_logprobs is not None:  # vLLM puts a chat's beside its choices
            body["prompt_logprobs"] = self.prompt_logprobs(self.prompt, _group(outputs)[0]["prompt"])
        return body

    async def stream(self, merged: AsyncIterator[tuple[int, SequenceOutput]]) -> AsyncIterator[dict]:
        head = self._head("chunk")
        parsers: dict[int, ToolCallParser] = {}
        calls_made: dict[int, int] = {}  # choice -> tool calls streamed so far

        def chunk(index: int, delta: dict, logprobs=None, finish_reason=None) -> dict:
            return {**head, "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                         "finish_reason": finish_reason}]}

        async for _, out in merged:
            i = out.index
            if i not in parsers:  # the role comes first, in a chunk of its own
                parsers[i] = self.tool_parser() if self.tool_parser is not None else None
                calls_made[i] = 0
                first = chunk(i, {"role": "assistant", "content": ""})
                if out.prompt_logprobs is not None and self.body.prompt_logprobs is not None:
                    first["prompt_logprobs"] = self.prompt_logprobs(self.prompt, out.prompt_logprobs)
                yield first
                if self.echo:
                    yield chunk(i, {"content": self.echo})
            self.count(0, out)
            entries = self.visible(out.new_logprobs, out.finish_reason)
            text, calls = out.new_text, []
            if parsers[i] is not None:
                text, calls = parsers[i].push(out.new_tokens, out.new_text)
                if out.finish_reason:
                    rest, more = parsers[i].finish()
                    text, calls = text + rest, calls + more
            if text or (self.k is not None and entries):
                yield chunk(i, {"content": text}, self._logprobs(entries) if self.k is not None else None)
            for call in calls:
                for delta in _call_deltas(calls_made[i], call):
                    yield chunk(i, {"tool_calls": [delta]})
                calls_made[i] += 1
            if out.finish_reason:
                yield chunk(i, {}, finish_reason=_tool_finish(out.finish_reason) if calls_made[i] else out.finish_reason)


def _tool_finish(finish: str | None) -> str | None:
    """An output that ended by itself after calling tools ends with "tool_calls", as OpenAI's do."""
    return "tool_calls" if finish == "stop" else finish


def _call_deltas(index: int, call: ToolCall) -> list[dict]:
    """One tool call as OpenAI streams it: its id and name first, then its arguments."""
    return [{"index": index, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}},
            {"index": index, "function": {"arguments": call.arguments}}]


def _echo(body) -> str:
    """vLLM's chat `echo`: the last message's content, when that message is the assistant's (the answer
    continues it, as with `continue_final_message`)."""
    last = body.messages[-1]
    if not body.echo or last.role != "assistant" or not last.content:
        return ""
    return last.content if isinstance(last.content, str) else "".join(p.get("text", "") for p in last.content)
