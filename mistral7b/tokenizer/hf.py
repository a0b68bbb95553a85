"""A `tokenizers.Tokenizer` plus a Jinja chat template: Hugging Face `tokenizer.json` folders, and the
vocabularies of GGUF files once `gguf.py` has built them into a `tokenizers.Tokenizer`."""

from __future__ import annotations

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
from .base import Tokenizer

_PROBE = "\x00assistant-reply\x00"  # a reply text no template alters, to find what follows a reply


class HFTokenizer(Tokenizer):
    """`bos`/`eos`: the texts of those tokens (the template's `bos_token`/`eos_token`); `add_bos`: whether
    a sequence starts with BOS (added to a chat when the template does not write it); `stop_ids`:
    end-of-turn ids the vocabulary declares beyond EOS (the template's own is found by rendering)."""

    def __init__(self, tokenizer: RustTokenizer, *, bos: str | None, eos: str | None, add_bos: bool,
                 chat_template: str | None, source: Path, stop_ids: Iterable[int] = ()):
        self.backend = tokenizer  # the `tokenizers.Tokenizer`, e.g. to save a GGUF vocabulary as tokenizer.json
        # A second copy encodes plain text, where control-token texts ("<|im_end|>") stay text; the
        # backend encodes rendered chat templates, which write control tokens as text.
        self._text = RustTokenizer.from_str(tokenizer.to_str())
        self._text.encode_special_tokens = True
        self._bos, self._eos = bos, eos
        # _renders_tools: whether the template renders `tools` itself (if not, tools.inline_tools writes them)
        self._template, self._renders_tools = _compile(chat_template, source) if chat_template else (None, False)
        specials = {t.content: i for i, t in sorted(tokenizer.get_added_tokens_decoder().items()) if t.special}
        bos_id = tokenizer.token_to_id(bos) if bos else None
        eos_id = tokenizer.token_to_id(eos) if eos else None
        super().__init__(bos_id=bos_id, eos_id=eos_id, add_bos=add_bos,
                         vocab_size=tokenizer.get_vocab_size(with_added_tokens=True), special_tokens=specials,
                         stop_ids=[eos_id, *stop_ids, self._end_of_turn_id(specials)])

    def _encode(self, text: str) -> list[int]:
        return self._text.encode(text, add_special_tokens=False).ids

    def _decode(self, ids: list[int]) -> str:
        return self.backend.decode(ids, skip_special_tokens=False)

    def _encode_chat(self, messages: list[dict], tools: list[dict] | None) -> list[int]:
        if self._template is None:
            raise InputError("this model's tokenizer has no chat template; send a plain prompt instead")
        if not self._renders_tools and (tools or any(m.get("tool_calls") or m["role"] == "tool" for m in messages)):
            messages, tools = inline_tools(messages, tools), None
        text = self._render(messages, add_generation_prompt=True, tools=tools)
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if self.add_bos and ids[:1] != [self.bos_id]:
            ids.insert(0, self.bos_id)
        return ids

    def _render(self, messages: list[dict], add_generation_prompt: bool, tools: list[dict] | None = None) -> str:
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=self._bos or "", eos_token=self._eos or "",
                                         **({"tools": tools} if tools else {}))
        except jinja2.TemplateError as e:
            raise InputError(f"the chat template rejects these messages: {e}") from None

    def _end_of_turn_id(self, specials: dict[str, int]) -> int | None:
        """The special token the template writes right after an assistant reply (`<|im_end|>`, `</s>`, ...)."""
        if self._template is None:
            return None
        try:
            text = self._render([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE}], False)
        except InputError:  # a template that insists on other conversations: rely on EOS alone
            return None
        after = text.partition(_PROBE)[2].lstrip()
        ids = self.backend.encode(after, add_special_tokens=False).ids if after else []
        return ids[0] if ids and ids[0] in specials.values() else None


def _compile(template: str, source: Path) -> tuple[jinja2.Template, bool]:
    """-> (the template, whether it uses a `tools` variable)."""
    # The environment transformers renders chat templates in: sandboxed, with its helpers.
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                      extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template), "tools" in jinja2.meta.find_undeclared_variables(env.parse(template))
    except jinja2.TemplateSyntaxError as e:
        raise CheckpointError(f"{source}: its chat template is not valid Jinja ({e}, line {e.lineno})") from None


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
