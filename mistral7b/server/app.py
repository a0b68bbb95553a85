"""The OpenAI-compatible HTTP API over the engine (FastAPI). This module owns HTTP only: parsing,
errors, streaming; the engine thread does the work and `responses.py` shapes the bodies."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from typing import AsyncIterator

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .. import __version__
from ..engine import Engine, QueueFull, Request
from ..engine.threaded import ThreadedEngine
from ..errors import InputError
from ..sampling import SamplingError
from . import responses
from .metrics import Metrics
from .protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest


class APIError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "BadRequestError", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type, param


def _error(status: int, message: str, type: str, param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": status}}, status_code=status)


def create_app(engine: Engine, tokenizer, *, model_name: str, api_key: str | None = None) -> FastAPI:
    metrics = Metrics()
    worker = ThreadedEngine(engine, on_step=metrics.on_step, on_token=metrics.on_token)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        worker.shutdown()

    app = FastAPI(title="mistral7b", version=__version__, lifespan=lifespan)
    app.state.worker = worker
    max_len = engine.max_model_len

    # -- errors: the OpenAI/vLLM body, never a 500 for a client's mistake ----------------------
    @app.exception_handler(APIError)
    async def _api_error(_, e: APIError):
        return _error(e.status, e.message, e.type, e.param)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        loc = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
        return _error(400, f"{loc or 'body'}: {first.get('msg', 'invalid request')}", "BadRequestError", loc)

    @app.exception_handler(InputError)
    async def _input(_, e: InputError):
        return _error(400, str(e), "BadRequestError")

    @app.exception_handler(SamplingError)
    async def _sampling(_, e: SamplingError):
        return _error(400, str(e), "BadRequestError", e.param)

    @app.exception_handler(QueueFull)
    async def _full(_, e: QueueFull):
        return _error(503, str(e), "ServiceUnavailableError")

    @app.middleware("http")
    async def _auth(request: HTTPRequest, call_next):
        if api_key and request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return _error(401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                              "AuthenticationError")
        return await call_next(request)

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise APIError(404, f"The model `{name}` does not exist (this server serves `{model_name}`).",
                           type="NotFoundError", param="model")

    # -- informational routes ------------------------------------------------------------------
    @app.get("/health")
    async def health():
        return {}

    @app.get("/version")
    async def version():
        return {"version": __version__}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": responses.now(),
                                            "owned_by": "mistral7b", "root": model_name, "max_model_len": max_len}]}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of `prompt` or `messages`", param="prompt")
        if body.messages is not None:
            ids = tokenizer.encode_chat([m.model_dump(exclude_none=True) for m in body.messages])
        else:
            ids = tokenizer.encode(body.prompt, bos=tokenizer.add_bos and body.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": max_len}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        check_model(body.model)
        bad = [t for t in body.tokens if not 0 <= t < engine.model.args.vocab_size]
        if bad:
            raise APIError(400, f"token id(s) {bad[:5]} are outside the vocabulary", param="tokens")
        return {"prompt": tokenizer.decode(body.tokens)}

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        names = {v: k for k, v in tokenizer.special_tokens.items()}
        return {"tokenizer_class": type(tokenizer).__name__, "vocab_size": tokenizer.vocab_size,
                "bos_token": names.get(tokenizer.bos_id), "eos_token": names.get(tokenizer.eos_id),
                "bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "add_bos_token": tokenizer.add_bos,
                "stop_token_ids": tokenizer.stop_ids, "model_max_length": max_len,
                "chat_template": getattr(tokenizer, "chat_template", None)}

    # -- generation ----------------------------------------------------------------------------
    def default_max_tokens(prompt_len: int) -> int:
        return max_len - prompt_len if max_len is not None else (engine.model.args.max_seq_len or 4096)

    async def run_all(requests: list[Request], http: HTTPRequest) -> list[list]:
        """Collect every output of every request; abort them if the client goes away."""
        async def collect(r: Request) -> list:
            return [out async for out in worker.generate(r)]

        task = asyncio.gather(*(collect(r) for r in requests))
        while not task.done():
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if not done and await http.is_disconnected():
                task.cancel()  # each generator's finally aborts its request in the engine
                raise APIError(499, "client disconnected")
        return task.result()

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HTTPRequest):
        check_model(body.model)
        if body.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        if body.best_of not in (None, body.n):
            raise APIError(400, "best_of is not supported (use n)", param="best_of")
        prompts = _prompt_ids(body.prompt, tokenizer)
        requests = []
        for ids in prompts:
            max_tokens = body.max_tokens if body.max_tokens is not None else default_max_tokens(len(ids))
            params = body.sampling(max_tokens=max_tokens, logprobs=body.logprobs,
                                   prompt_logprobs=body.logprobs if body.echo and body.logprobs is not None else None)
            requests.append(Request(ids, params))
        for r in requests:
            engine.validate(r)
        worker.check_capacity(len(requests))
        shaper = responses.Completions(tokenizer, model_name, prompts, body)
        if body.stream:
            return _sse(shaper.stream(_merge([worker.generate(r) for r in requests])), include_usage=
                        bool(body.stream_options and body.stream_options.include_usage), usage=shaper.usage)
        return shaper.response(await run_all(requests, http))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, http: HTTPRequest):
        check_model(body.model)
        if body.tools:
            raise APIError(400, "tools are not supported", param="tools")
        if body.response_format and body.response_format.get("type") not in (None, "text"):
            raise APIError(400, "response_format other than text is not supported", param="response_format")
        ids = tokenizer.encode_chat([m.model_dump(exclude_none=True) for m in body.messages])
        max_tokens = body.max_completion_tokens or body.max_tokens
        params = body.sampling(max_tokens=max_tokens if max_tokens is not None else default_max_tokens(len(ids)),
                               logprobs=(body.top_logprobs or 0) if body.logprobs else None)
        request = Request(ids, params)
        engine.validate(request)
        worker.check_capacity(1)
        shaper = responses.ChatCompletions(tokenizer, model_name, ids, body)
        if body.stream:
            return _sse(shaper.stream(_merge([worker.generate(request)])), include_usage=
                        bool(body.stream_options and body.stream_options.include_usage), usage=shaper.usage)
        return shaper.response((await run_all([request], http))[0])

    return app


def _prompt_ids(prompt, tokenizer) -> list[list[int]]:
    """The four prompt shapes of /v1/completions -> token-id lists. Text gets the model's BOS;
    token ids are taken as given (lm-eval relies on that)."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt must not be empty", param="prompt")
    if isinstance(prompt[0], int):
        prompt = [prompt]
    out = []
    for p in prompt:
        ids = tokenizer.encode(p, bos=tokenizer.add_bos) if isinstance(p, str) else list(p)
        if not ids:
            raise APIError(400, "prompt must not be empty", param="prompt")
        out.append(ids)
    return out


async def _merge(streams: list[AsyncIterator]) -> AsyncIterator[tuple[int, object]]:
    """Interleave several requests' outputs as they come: (request number, output)."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, stream: AsyncIterator) -> None:
        try:
            async for out in stream:
                await queue.put((i, out))
        except Exception as e:  # surfaces in the consumer
            await queue.put((i, e))
        finally:
            await queue.put((i, done))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


def _sse(chunks: AsyncIterator[dict], *, include_usage: bool, usage) -> StreamingResponse:
    async def body():
        async for chunk in chunks:
            yield f"data: {json.dumps(chunk)}\n\n"
        if include_usage:
            yield f"data: {json.dumps(usage())}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream")
