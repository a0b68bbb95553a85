"""Structured outputs: a JSON schema, a regex, a list of choices or a Lark/GBNF grammar, compiled by
llguidance into a matcher per sequence whose token masks the engine's sampler applies to the batch.

A `Constraint` is what a request asks for (plain data, part of `SamplingParams`); `Grammars` compiles
it against one tokenizer (the llguidance view of its vocabulary is built once, ~1 s) into a
`Grammar`, checked before the request is queued; each sequence runs its own copy (`Grammar.matcher`).
At every step `mask_logits` computes the allowed-token bitmask of each constrained row (on the CPU)
and sets the others to -inf, so constrained and free rows share a step.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass

import llguidance
import numpy as np
import torch

from .sampling import SamplingError

_JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
KINDS = ("json", "regex", "choice", "grammar", "lark")


class ConstraintError(SamplingError):
    """A constraint that cannot be compiled (bad schema, regex or grammar); `param` names its field."""


@dataclass(frozen=True)
class Constraint:
    """What the output must match. kind: "json" (spec: a JSON schema as JSON text; `{"type": "object"}`
    for any object), "regex", "choice" (spec: a JSON list of strings), "grammar" (Lark, or llama.cpp's
    GBNF) or "lark" (Lark only, with llguidance's extensions: `%json`, `<[token id]>`); `param` names the request field it came from, for error messages."""

    kind: str
    spec: str
    param: str = "structured_outputs"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConstraintError(self.param, f"{self.param}: unknown kind {self.kind!r} (one of {', '.join(KINDS)})")

    @classmethod
    def json_schema(cls, schema, param: str = "structured_outputs") -> Constraint:
        """A schema as a dict (or its JSON text); it must be a JSON object."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise ConstraintError(param, f"{param}: the schema is not valid JSON ({e})") from None
        if not isinstance(schema, dict):
            raise ConstraintError(param, f"{param}: a JSON schema must be an object, got {type(schema).__name__}")
        return cls("json", json.dumps(schema), param)

    @classmethod
    def choice(cls, options, param: str = "structured_outputs") -> Constraint:
        if not isinstance(options, list) or not options or not all(isinstance(o, str) and o for o in options):
            raise ConstraintError(param, f"{param}: choices must be a non-empty list of non-empty strings")
        return cls("choice", json.dumps(options), param)

    def lark(self) -> str:
        """The llguidance grammar text of this constraint (not yet checked)."""
        build = {
            "choice": lambda: llguidance.LLMatcher.grammar_from_lark(
                "start: " + " | ".join(json.dumps(o) for o in json.loads(self.spec))),
            "lark": lambda: llguidance.LLMatcher.grammar_from_lark(self.spec),
            "grammar": lambda: llguidance.grammar_from("grammar", self.spec),  # Lark, or GBNF converted to Lark
            "regex": lambda: llguidance.LLMatcher.grammar_from_regex(self.spec),
            # JSON as json.dumps writes it (", " and ": "), the form models write most; whitespace is not
            # free, or a model that likes newlines could fill max_tokens with them (llguidance's default).
            "json": lambda: llguidance.LLMatcher.grammar_from_json_schema(self.spec, defaults=_JSON_LAYOUT),
        }[self.kind]
        try:
            return build()
        except ValueError as e:  # a GBNF grammar that does not convert, a schema that is not an object
            raise ConstraintError(self.param, f"{self.param}: {e}") from None


class Grammar:
    """A compiled constraint: `matcher()` gives each sequence its own state."""

    def __init__(self, matcher: llguidance.LLMatcher):
        self._prototype = matcher

    def matcher(self) -> llguidance.LLMatcher:
        return self._prototype.deep_copy()


class Grammars:
    """Compiles constraints against one tokenizer's vocabulary (`vocab_size` is the model's: rows of the
    logits past the tokenizer's own vocabulary are never allowed)."""

    def __init__(self, tokenizer, vocab_size: int):
        self._tokenizer, self._vocab_size = tokenizer, vocab_size
        self._ll: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()  # requests are validated on several threads

    @property
    def ll_tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._ll is None:
                self._ll = ll_tokenizer(self._tokenizer, self._vocab_size)
            return self._ll

    def compile(self, constraint: Constraint) -> Grammar:
        """-> a Grammar, or ConstraintError naming the request field for a bad schema/regex/grammar."""
        matcher = llguidance.LLMatcher(self.ll_tokenizer, constraint.lark(), log_level=0)
        if matcher.is_error():
            raise ConstraintError(constraint.param, f"{constraint.param}: {_first_line(matcher.get_error())}")
        return Grammar(matcher)


def ll_tokenizer(tokenizer, vocab_size: int) -> llguidance.LLTokenizer:
    """llguidance's view of our tokenizer: the bytes of every token, which are special, and the ids
    that may end an output (EOS and the chat format's end of turn)."""
    backend = getattr(tokenizer, "backend", None)
    # A `tokenizers.Tokenizer` (Hugging Face files, GGUF vocabularies) as its JSON; Mistral's files as
    # their bytes per token (tokenizer/mistral.py).
    vocabulary = backend.to_str() if backend is not None else llguidance.TokenizerWrapper(tokenizer.byte_vocabulary())
    return llguidance.LLTokenizer(vocabulary, n_vocab=vocab_size, eos_token=tokenizer.stop_ids)


def _first_line(message: str) -> str:
    return message.strip().splitlines()[0] if message.strip() else "invalid grammar"


def mask_logits(logits: torch.Tensor, matchers: list[llguidance.LLMatcher | None]) -> None:
    """logits [B, vocab] (fp32, CPU or not); matchers[i] constrains row i (None: free) -> every token row
    i's matcher does not allow gets -inf, in place.

    The masks are computed one after another on this thread (a few microseconds each mid-string, at most
    a few hundred at a structural choice; llguidance's thread pool kept spinning against the decode
    kernels' threads), and expanded from bits with numpy: torch's element-wise ops over the vocabulary
    took ~40 ms a row here, numpy's 0.05 ms (BENCHMARKS.md, structured outputs)."""
    rows = [i for i, m in enumerate(matchers) if m is not None]
    if not rows:
        return
    vocab = logits.shape[1]
    bitmask = np.full((len(rows), (vocab + 31) // 32), -1, dtype=np.int32)  # [R, words], bit t % 32 of word t // 32
    for j, i in enumerate(rows):
        matchers[i].unsafe_compute_mask_ptr(bitmask[j].ctypes.data, bitmask.shape[1] * 4)
    # Little-endian words: their bytes' bits, least significant first, are the tokens in order.
    refused = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")[:, :vocab] == 0  # [R, vocab]
    if logits.is_cpu and logits.dtype == torch.float32 and logits.is_contiguous():
        view = logits.numpy()
        for j, i in enumerate(rows):
            np.putmask(view[i], refused[j], -np.inf)
        return
    index = torch.tensor(rows, device=logits.device)
    logits[index] = logits[index].masked_fill(torch.from_numpy(refused).to(logits.device), float("-inf"))
