"""A `tokenizers.Tokenizer` plus a Jinja chat template: Hugging Face `tokenizer.json` folders, and the
vocabularies of GGUF files once `gguf.py` has built them into a `tokenizers.Tokenizer`."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.meta
import jinja2.sandbox
from tokenizers import Tokenizer as RustTokenizer

from ..errors import CheckpointError, InputError
from ..tools import inline_tools
from .base import ChatTemplateError, Tokenizer

_PROBE = "\x00assistant-reply\x00"  # a reply text no template alters, to find what follows a reply
_CONTINUE = "CONTINUE_FINAL_MESSAGE_TAG "  # transformers' mark of where the message to continue ends


class HFTokenizer(Tokenizer):
    """`bos`/`eos`: the texts of those tokens (the template's `bos_token`/`eos_token`); `add_bos`: whether
    a sequence starts with BOS (added to a chat when the template does not write it); `stop_ids`:
    end-of-turn ids the vocabulary declares beyond EOS (the template's own is found by rendering)."""

    def __init__(self, tokenizer: RustTokenizer, *, bos: str | None, eos: str | None, add_bos: bool,
                 chat_template: str | None, source: Path, stop_ids: Iterable[int] = ()):
        self.backend = tokenizer  # the `tokenizers.Tokenizer`, e.g. to save a GGUF vocabulary as tokenizer.json
        self._bos, self._eos = bos, eos
        specials = {t.content: i for i, t in sorted(tokenizer.get_added_tokens_decoder().items()) if t.special}
        bos_id = tokenizer.token_to_id(bos) if bos else None
        eos_id = tokenizer.token_to_id(eos) if eos else None
        super().__init__(bos_id=bos_id, eos_id=eos_id, add_bos=add_bos,
                         vocab_size=tokenizer.get_vocab_size(with_added_tokens=True), special_tokens=specials,
                         stop_ids=[eos_id, *stop_ids])
        self._declared_stops = self.stop_ids
        self.chat_template, self._template = None, None
        if chat_template:
            try:
                self.set_chat_template(chat_template, f"{source}: its chat template")
            except ChatTemplateError as e:
                raise CheckpointError(str(e)) from None

    def set_chat_template(self, template: str, source: str) -> None:
        self.chat_template, self._template = template, _jinja(template, source)
        self.stop_ids = list(dict.fromkeys(i for i in [*self._declared_stops, self._end_of_turn_id()] if i is not None))

    @functools.cached_property
    def _text(self) -> RustTokenizer:
        """A second copy that encodes plain text, where control-token texts ("<|im_end|>") stay text; the
        backend parses them, as in rendered chat templates, which write control tokens as text. Made
        on first use (~0.1 s for a 50k vocabulary): a chat whose messages hold no such text never needs it."""
        text = RustTokenizer.from_str(self.backend.to_str())
        text.encode_special_tokens = True
        return text

    def _encode(self, text: str, special: bool) -> list[int]:
        return (self.backend if special else self._text).encode(text, add_special_tokens=False).ids

    def _decode(self, ids: list[int]) -> str:
        return self.backend.decode(ids, skip_special_tokens=False)

    def _encode_chat(self, messages: list[dict], tools: list[dict] | None, *, add_generation_prompt: bool,
                     continue_final_message: bool, chat_template: str | None) -> list[int]:
        template = self._template if chat_template is None else _jinja(chat_template, "chat_template")
        if template is None:
            raise InputError("this model's tokenizer has no chat template; send a plain prompt (or a chat_template) "
                             "instead")
        # A template that does not render `tools` itself gets them, and the calls, written as text.
        if not _renders_tools(chat_template or self.chat_template) and (
                tools or any(m.get("tool_calls") or m["role"] == "tool" for m in messages)):
            messages, tools = inline_tools(messages, tools), None
        messages, marks = self._shield(messages)
        if continue_final_message:
            messages = [*messages[:-1], {**messages[-1], "content": (messages[-1]["content"] or "") + _CONTINUE}]
        text = _render(template, messages, add_generation_prompt, bos=self._bos, eos=self._eos, tools=tools)
        if continue_final_message:
            text = _open_final_message(text)
        ids = self._encode_rendered(text, marks)
        if self.add_bos and ids[:1] != [self.bos_id]:
            ids.insert(0, self.bos_id)
        return ids

    def _shield(self, messages: list[dict]) -> tuple[list[dict], dict[str, str]]:
        """Messages whose contents hold special-token text ("<|im_start|>") get a private-use character in
        its place, one no content holds, so that only the template's own special-token texts are parsed
        (a message cannot open a turn). -> (messages, {character: the text it stands for})."""
        contents = [m["content"] for m in messages if m["content"]]
        found = sorted({t for c in contents for t in self._special_text.findall(c)})
        if not found:
            return messages, {}
        used = set("".join(contents))
        free = (chr(c) for c in range(0xF0000, 0x110000) if chr(c) not in used)  # Unicode's private-use planes
        marks = {text: next(free) for text in found}
        shielded = [{**m, "content": self._special_text.sub(lambda t: marks[t.group()], m["content"])}
                    if m["content"] else m for m in messages]
        return shielded, {mark: text for text, mark in marks.items()}

    def _encode_rendered(self, text: str, marks: dict[str, str]) -> list[int]:
        """A rendered chat: its special-token texts become tokens, the shielded ones go back to text.
        The backend encodes the text between special tokens piece by piece, so this equals its own
        encoding wherever no message holds special-token text."""
        encoding = self.backend.encode(text, add_special_tokens=False)
        if not marks:
            return encoding.ids
        restore = str.maketrans(marks)
        ids, start = [], 0
        for token, (begin, end) in zip(encoding.ids, encoding.offsets):
            if token in self._special_ids:
                ids += self._text.encode(text[start:begin].translate(restore), add_special_tokens=False).ids
                ids.append(token)
                start = end
        return ids + self._text.encode(text[start:].translate(restore), add_special_tokens=False).ids

    def _end_of_turn_id(self) -> int | None:
        """The special token the template writes right after an assistant reply (`<|im_end|>`, `</s>`, ...)."""
        try:
            chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE}]
            text = _render(self._template, chat, False, bos=self._bos, eos=self._eos)
        except InputError:  # a template that insists on other conversations: rely on EOS alone
            return None
        after = text.partition(_PROBE)[2].lstrip()
        ids = self.backend.encode(after, add_special_tokens=False).ids if after else []
        return ids[0] if ids and ids[0] in self._special_ids else None


def _render(template: jinja2.Template, messages: list[dict], add_generation_prompt: bool, *, bos: str | None,
            eos: str | None, tools: list[dict] | None = None) -> str:
    try:
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               bos_token=bos or "", eos_token=eos or "", **({"tools": tools} if tools else {}))
    except Exception as e:  # a template is a program (maybe the client's): what it raises is the request's fault
        raise InputError(f"the chat template rejects these messages: {e}") from None


def _open_final_message(text: str) -> str:
    """`continue_final_message`, as transformers does it: the chat cut where the final message's content
    ended (marked by `_CONTINUE`), leaving out what the template writes to close that turn; without the
    content's trailing whitespace when the template trimmed it."""
    at = text.rfind(_CONTINUE.strip())
    if at < 0:
        raise InputError("continue_final_message: the chat template does not write the final message's content")
    return text[:at] if text.startswith(_CONTINUE, at) else text[:at].rstrip()


def _jinja(template: str, source: str) -> jinja2.Template:
    try:
        return _compile(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"{source} is not valid Jinja ({e}, line {e.lineno})") from None


@functools.lru_cache(maxsize=16)  # a client sends its chat_template with every request
def _compile(template: str) -> jinja2.Template:
    return _environment().from_string(template)


@functools.lru_cache(maxsize=16)
def _renders_tools(template: str | None) -> bool:
    """Whether a template uses a `tools` variable (renders function definitions itself)."""
    return bool(template) and "tools" in jinja2.meta.find_undeclared_variables(_environment().parse(template))


@functools.cache
def _environment() -> jinja2.Environment:
    # The environment transformers renders chat templates in: sandboxed, with its helpers.
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                      extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _raise(message: str):
    raise jinja2.TemplateError(message)


def load_folder(tokenizer_json: Path) -> HFTokenizer:
    """`tokenizer.json`, with `tokenizer_config.json` (BOS/EOS, chat template) and `chat_template.jinja` beside it."""
    folder = tokenizer_json.parent
    tokenizer = RustTokenizer.from_file(str(tokenizer_json))
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.exists() else {}
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        template = {t["name"]: t["template"] for t in template}.get("default")
    if (folder / "chat_template.jinja").exists():
        template = (folder / "chat_template.jinja").read_text()
    bos, eos = _token_text(config.get("bos_token")), _token_text(config.get("eos_token"))
    bos_id = tokenizer.token_to_id(bos) if bos else None
    # The post-processor, not a config flag, decides whether encodings start with BOS.
    add_bos = bos_id is not None and tokenizer.encode("a").ids[:1] == [bos_id]
    return HFTokenizer(tokenizer, bos=bos, eos=eos, add_bos=add_bos, chat_template=template, source=tokenizer_json)


def _token_text(token: str | dict | None) -> str | None:
    return token.get("content") if isinstance(token, dict) else token
