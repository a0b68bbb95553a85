"""Shaping engine outputs into OpenAI response bodies and stream chunks."""

from __future__ import annotations

import time
import uuid
from typing import AsyncIterator

from ..engine import SequenceOutput, TokenLogprob


def now() -> int:
    return int(time.time())


class _Shaper:
    """State shared by both endpoints: ids, token strings, usage accounting."""

    object_name = ""
    id_prefix = ""

    def __init__(self, tokenizer, model_name: str, body):
        self.tokenizer, self.model_name, self.body = tokenizer, model_name, body
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.created = now()
        self.n = body.n
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self._cached: dict[int, int] = {}  # prompt index -> its tokens found in the prefix cache
        self._names = {v: k for k, v in tokenizer.special_tokens.items()}
        self.stop_ids = set(body.stop_token_ids or ()) | (set() if body.ignore_eos else set(tokenizer.stop_ids))

    def token_text(self, token: int) -> str:
        return self._names.get(token) if token in self._names else self.tokenizer.decode([token])

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
        return {"id": self.id, "object": name, "created": self.created, "model": self.model_name}


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
            if text or out.finish_reason or (logprobs and logprobs["tokens"]):
                yield {**self._head(), "choices": [{"index": index, "text": text, "logprobs": logprobs,
                                                    "finish_reason": out.finish_reason}]}


class ChatCompletions(_Shaper):
    object_name = "chat.completion"
    id_prefix = "chatcmpl"

    def __init__(self, tokenizer, model_name: str, prompt: list[int], body):
        super().__init__(tokenizer, model_name, body)
        self.prompt_tokens = len(prompt)
        self.k = (body.top_logprobs or 0) if body.logprobs else None

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
            choices.append({"index": j, "message": {"role": "assistant", "content": c["text"]},
                            "logprobs": logprobs, "finish_reason": c["finish"]})
        return {**self._head(), "choices": choices, "usage": self.usage()["usage"]}

    async def stream(self, merged: AsyncIterator[tuple[int, SequenceOutput]]) -> AsyncIterator[dict]:
        head = self._head("chunk")
        started: set[int] = set()
        async for _, out in merged:
            if out.index not in started:  # the role comes first, in a chunk of its own
                started.add(out.index)
                yield {**head, "choices": [{"index": out.index, "delta": {"role": "assistant", "content": ""},
                                            "logprobs": None, "finish_reason": None}]}
            self.count(0, out)
            entries = self.visible(out.new_logprobs, out.finish_reason)
            if out.new_text or (self.k is not None and entries):
                yield {**head, "choices": [{"index": out.index, "delta": {"content": out.new_text},
                                            "logprobs": self._logprobs(entries) if self.k is not None else None,
                                            "finish_reason": None}]}
            if out.finish_reason:
                yield {**head, "choices": [{"index": out.index, "delta": {}, "logprobs": None,
                                            "finish_reason": out.finish_reason}]}
