"""Where log-likelihoods and samples come from: our engine in this process (every request queued at
once so the engine batches them) or a running `mistral7b serve` (`--server URL`).

Both tokenise as lm-eval does: no BOS, trailing spaces of the context moved to the continuation,
the continuation's tokens being what encoding the whole adds after the context's tokens; an empty
context is replaced by the BOS (else EOS) token.
"""

from __future__ import annotations

import json
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol

from tqdm import tqdm

from ..errors import InputError

if TYPE_CHECKING:  # torch: imported when a model is scored, not by `mistral7b eval --help`
    from ..sampling import SamplingParams


@dataclass(frozen=True)
class Sampling:
    """How to sample: `n` samples per prompt; with a seed, sample i draws from seed + i."""

    max_tokens: int
    stop: tuple[str, ...] = ()
    n: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


class Backend(Protocol):
    name: str

    def loglikelihood(self, pairs: list[tuple[str, str]]) -> list[float]:
        """Summed log-probability of each continuation given its context."""

    def generate(self, prompts: list[str], how: Sampling) -> list[list[str]]:
        """`how.n` completions of each prompt, cut before the first stop string."""


def encode_pair(encode: Callable[[str], list[int]], prefix_id: int, context: str,
                continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids), split as lm-eval splits them."""
    if not context:
        return [prefix_id], encode(continuation)
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    context_ids = encode(context)
    return context_ids, encode(context + continuation)[len(context_ids):]


def _sampling(how: Sampling, **extra) -> SamplingParams:
    from ..sampling import SamplingParams

    return SamplingParams(max_tokens=how.max_tokens, stop=how.stop, n=how.n, temperature=how.temperature,
                          top_p=how.top_p, seed=how.seed, **extra)


class EngineBackend:
    """Scores through our continuous-batching engine, up to `max_num_seqs` sequences per step."""

    def __init__(self, model, tokenizer, *, name: str, max_num_seqs: int = 16, max_tokens_per_step: int = 1024,
                 progress: bool = True):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.max_num_seqs, self.max_tokens_per_step, self.progress = max_num_seqs, max_tokens_per_step, progress
        self.prefix_id = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id

    def loglikelihood(self, pairs: list[tuple[str, str]]) -> list[float]:
        from ..sampling import SamplingParams

        encoded = [encode_pair(self.tokenizer.encode, self.prefix_id, c, x) for c, x in pairs]
        params = SamplingParams(max_tokens=0, prompt_logprobs=0)
        outs = self._run([ctx + cont for ctx, cont in encoded], params, "log-likelihoods")
        return [sum(e.logprob for e in out[0].prompt_logprobs[-len(cont):]) for out, (_, cont) in zip(outs, encoded)]

    def generate(self, prompts: list[str], how: Sampling) -> list[list[str]]:
        outs = self._run([self.tokenizer.encode(p) for p in prompts], _sampling(how), "generating")
        return [[o.text for o in sorted(out, key=lambda o: o.index)] for out in outs]

    def _run(self, prompts: list[list[int]], params: SamplingParams, what: str) -> list[list[_Done]]:
        """Queue every prompt, step until all are done; per prompt, its finished sequences."""
        from ..engine import Engine, Request

        longest = max(len(p) for p in prompts) + params.max_tokens
        engine = Engine(self.model, self.tokenizer, max_num_seqs=max(self.max_num_seqs, params.n),
                        max_model_len=longest, max_tokens_per_step=self.max_tokens_per_step,
                        max_queue=len(prompts))
        requests = [engine.add_request(Request(p, params)) for p in prompts]
        index = {r.request_id: i for i, r in enumerate(requests)}
        done: list[dict[int, _Done]] = [{} for _ in prompts]
        with tqdm(total=len(prompts) * params.n, desc=what, unit="seq", disable=not self.progress) as bar:
            while engine.has_work:
                for out in engine.step():
                    seq = done[index[out.request_id]].setdefault(out.index, _Done(out.index))
                    seq.text += out.new_text
                    if out.prompt_logprobs is not None:
                        seq.prompt_logprobs = out.prompt_logprobs
                    if out.finish_reason is not None:
                        bar.update(1)
        return [list(d.values()) for d in done]


@dataclass
class _Done:
    index: int
    text: str = ""
    prompt_logprobs: list | None = None


class ServerBackend:
    """Scores through `mistral7b serve` (or any server with /tokenize and echo+logprobs completions):
    batches of token-id prompts, several HTTP calls in flight so the server's engine batches them."""

    def __init__(self, url: str, *, batch: int = 8, concurrency: int = 4, progress: bool = True):
        self.url = url.rstrip("/").removesuffix("/v1")
        self.batch, self.concurrency, self.progress = batch, concurrency, progress
        self.name = self._get("/v1/models")["data"][0]["id"]
        info = self._get("/tokenizer_info")
        self.prefix_id = info.get("bos_token_id") if info.get("bos_token_id") is not None else info.get("eos_token_id")

    def _get(self, path: str) -> dict:
        try:
            with urllib.request.urlopen(self.url + path, timeout=30) as r:
                return json.load(r)
        except OSError as e:
            raise InputError(f"cannot reach the server at {self.url}{path}: {e}") from None

    def _post(self, path: str, body: dict) -> dict:
        req = urllib.request.Request(self.url + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=3600) as r:
            return json.load(r)

    def encode(self, text: str) -> list[int]:
        # Special-token text stays text, as the local backend encodes it: the same scores either way.
        return self._post("/tokenize", {"prompt": text, "add_special_tokens": False, "parse_special": False})["tokens"]

    def _map(self, fn, items: list, what: str) -> list:
        """fn over batches of items, `concurrency` calls at a time, results in order."""
        batches = [items[i:i + self.batch] for i in range(0, len(items), self.batch)]
        out = []
        with ThreadPoolExecutor(self.concurrency) as pool, \
                tqdm(total=len(items), desc=what, unit="req", disable=not self.progress) as bar:
            for result in pool.map(fn, batches):
                out += result
                bar.update(len(result))
        return out

    def loglikelihood(self, pairs: list[tuple[str, str]]) -> list[float]:
        with ThreadPoolExecutor(self.concurrency) as pool:
            encoded = list(pool.map(lambda p: encode_pair(self.encode, self.prefix_id, *p), pairs))

        def score(batch):
            body = {"prompt": [c + x for c, x in batch], "max_tokens": 0, "echo": True, "logprobs": 0}
            choices = sorted(self._post("/v1/completions", body)["choices"], key=lambda c: c["index"])
            return [sum(c["logprobs"]["token_logprobs"][-len(x):]) for c, (_, x) in zip(choices, batch)]

        return self._map(score, encoded, "log-likelihoods")

    def generate(self, prompts: list[str], how: Sampling) -> list[list[str]]:
        with ThreadPoolExecutor(self.concurrency) as pool:
            encoded = list(pool.map(self.encode, prompts))

        def sample(batch):
            body = {"prompt": batch, "max_tokens": how.max_tokens, "stop": list(how.stop) or None, "n": how.n,
                    "temperature": how.temperature, "top_p": how.top_p, "seed": how.seed}
            choices = sorted(self._post("/v1/completions", body)["choices"], key=lambda c: c["index"])
            texts = [c["text"] for c in choices]
            return [texts[i * how.n:(i + 1) * how.n] for i in range(len(batch))]

        return self._map(sample, encoded, "generating")
