"""The OpenAI-compatible HTTP API over the engine (FastAPI). This module owns HTTP only: parsing,
errors, streaming; the engine thread does the work and `responses.py` shapes the bodies.

The routes are module-level; what they serve (one `Serving`) lives on `app.state.serving`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import secrets
import uuid
from http import HTTPStatus
from typing import Annotated, AsyncIterator, Callable

from fastapi import APIRouter, Depends, FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..engine import Engine, QueueFull, Request, SequenceOutput
from ..engine.threaded import EngineFailure, ShuttingDown, ThreadedEngine
from ..errors import InputError
from ..sampling import SamplingError
from ..guardrails import moderation_messages, moderation_params, moderation_result, with_safe_prompt
from ..tools import check_tool_choice, check_tool_messages, check_tools, tool_format
from . import responses
from .access_log import AccessLog
from .body_limit import DEFAULT_MAX_REQUEST_BYTES, BodyLimit
from .metrics import Metrics
from .protocol import (ChatCompletionRequest, ChatMessage, CompletionRequest, DetokenizeRequest, ErrorResponse,
                       ModerationRequest, TokenizeRequest)

log = logging.getLogger(__name__)


class APIError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "BadRequestError", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type, param


def _error_body(status: int, message: str, type: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": status}}


def _error(status: int, message: str, type: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(_error_body(status, message, type, param), status_code=status)


class Serving:
    """What the routes serve: the engine's thread, the tokenizer, the model's name and limits, metrics."""

    def __init__(self, engine: Engine, tokenizer, *, model_name: str, api_key: str | None = None):
        self.metrics = Metrics()
        self.worker = ThreadedEngine(engine, on_step=self.metrics.on_step, on_token=self.metrics.on_token)
        self.tokenizer, self.model_name, self.api_key = tokenizer, model_name, api_key
        self.max_len = engine.max_model_len
        self.model_args = engine.model.args

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(404, f"The model `{name}` does not exist (this server serves `{self.model_name}`).",
                           type="NotFoundError", param="model")

    def default_max_tokens(self, prompt_len: int) -> int:
        """What is left of the context; at least 1, so that a prompt too long for it gets the
        context-length error rather than a negative max_tokens."""
        return max(1, self.max_len - prompt_len) if self.max_len is not None else (self.model_args.max_seq_len or 4096)


def create_app(engine: Engine, tokenizer, *, model_name: str, api_key: str | None = None,
               max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, allowed_origins: list[str] = (),
               allowed_methods: list[str] = ("GET", "POST"), allowed_headers: list[str] = ("*",)) -> FastAPI:
    """allowed_*: CORS for browser UIs (none unless origins are given)."""
    app = FastAPI(title="mistral7b", version=__version__, lifespan=_lifespan)
    app.state.serving = Serving(engine, tokenizer, model_name=model_name, api_key=api_key)
    # The last one added runs first: the access log sees every answer, CORS ones and 413s too.
    app.add_middleware(BodyLimit, max_bytes=max_request_bytes)
    if allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins), allow_methods=list(allowed_methods),
                           allow_headers=list(allowed_headers))
    app.add_middleware(AccessLog)
    for error, handler in _ERROR_HANDLERS.items():
        app.add_exception_handler(error, handler)
    app.include_router(router)
    app.include_router(v1, prefix="/v1")
    app.include_router(v1, include_in_schema=False)  # for clients whose base URL lacks /v1
    _document_400s(app)
    return app


def _document_400s(app: FastAPI) -> None:
    """FastAPI's OpenAPI document lists a 422 for every route with a body; ours answer 400 then."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            for operations in build()["paths"].values():
                for operation in operations.values():
                    operation["responses"].pop("422", None)
        return app.openapi_schema

    app.openapi = openapi


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI):
    yield
    app.state.serving.worker.shutdown()


# -- errors: the OpenAI/vLLM body, never a 500 for a client's mistake --------------------------
async def _api_error(_, e: APIError):
    return _error(e.status, e.message, e.type, e.param)


async def _invalid(_, e: RequestValidationError):
    first = e.errors()[0] if e.errors() else {}
    if first.get("type") == "json_invalid":  # its loc is a character offset, not a field
        return _error(400, f"the body is not valid JSON: {first.get('msg')}", "BadRequestError")
    loc = first.get("loc", ())[1:]  # after "body"; union members add their type names ("prompt.str")
    where = ".".join(str(x) for x in loc) or "body"
    return _error(400, f"{where}: {first.get('msg', 'invalid request')}", "BadRequestError", str(loc[0]) if loc else None)


def _error_type(status: int) -> str:
    """OpenAI's names: 404 -> NotFoundError, 405 -> MethodNotAllowedError, 500 -> InternalServerError."""
    name = HTTPStatus(status).phrase.title().replace(" ", "").replace("-", "")
    return name if name.endswith("Error") else name + "Error"


async def _http(_, e: StarletteHTTPException):
    """Starlette's own errors (unknown route, wrong method, ...) in the OpenAI shape."""
    response = _error(e.status_code, str(e.detail), _error_type(e.status_code))
    response.headers.update(e.headers or {})
    return response


async def _unexpected(_, e: Exception):
    """A bug: a 500 in the OpenAI shape (Starlette logs the traceback)."""
    return _error(500, "internal server error", "InternalServerError")


async def _input(_, e: InputError):
    return _error(400, str(e), "BadRequestError", getattr(e, "param", None))


async def _sampling(_, e: SamplingError):
    return _error(400, str(e), "BadRequestError", e.param)


async def _full(_, e: QueueFull):
    response = _error(503, str(e), "ServiceUnavailableError")
    response.headers["Retry-After"] = "1"
    return response


async def _failed(_, e: EngineFailure):
    return _error(500, str(e), "InternalServerError")


async def _stopping(_, e: ShuttingDown):
    return _error(503, str(e), "ServiceUnavailableError")


_ERROR_HANDLERS = {APIError: _api_error, RequestValidationError: _invalid, InputError: _input,
                   SamplingError: _sampling, QueueFull: _full, EngineFailure: _failed, ShuttingDown: _stopping,
                   StarletteHTTPException: _http, Exception: _unexpected}


# -- dependencies ------------------------------------------------------------------------------
async def _serving(http: HTTPRequest) -> Serving:
    return http.app.state.serving


ServingDep = Annotated[Serving, Depends(_serving)]


async def _authorize(http: HTTPRequest, serving: ServingDep) -> None:
    """With --api-key, the /v1 routes want `Authorization: Bearer KEY`. A dependency, not an HTTP
    middleware: Starlette's BaseHTTPMiddleware hides the client's disconnect from the route."""
    expected = f"Bearer {serving.api_key}".encode()
    if serving.api_key and not secrets.compare_digest(http.headers.get("authorization", "").encode(), expected):
        raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')", type="AuthenticationError")


# What the OpenAPI document lists: the statuses these routes really answer with, in one shape.
_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 500, 503)}
router = APIRouter(responses=_ERRORS)
v1 = APIRouter(dependencies=[Depends(_authorize)], responses=_ERRORS)  # served under /v1, and without it


# -- informational routes ----------------------------------------------------------------------
@router.get("/health")
async def health():
    return {}


@router.get("/version")
async def version():
    return {"version": __version__}


@v1.get("/models")
async def models(serving: ServingDep):
    name = serving.model_name
    return {"object": "list", "data": [{"id": name, "object": "model", "created": responses.now(),
                                        "owned_by": "mistral7b", "root": name, "max_model_len": serving.max_len}]}


@router.get("/metrics")
async def prometheus(serving: ServingDep):
    return Response(generate_latest(serving.metrics.registry), media_type=CONTENT_TYPE_LATEST)


# Behind the key too: tokenizing is CPU work that anyone could ask of the server.
@router.post("/tokenize", dependencies=[Depends(_authorize)])
async def tokenize(body: TokenizeRequest, serving: ServingDep):
    serving.check_model(body.model)
    tokenizer = serving.tokenizer
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "give exactly one of `prompt` or `messages`", param="prompt")
    if body.messages is not None:
        ids = await run_in_threadpool(_encode_chat, tokenizer, body)
    else:
        bos = tokenizer.add_bos and body.add_special_tokens
        ids = await run_in_threadpool(tokenizer.encode, _unicode(body.prompt, "prompt"), bos=bos,
                                      special=body.parse_special)
    return {"tokens": ids, "count": len(ids), "max_model_len": serving.max_len}


@router.post("/detokenize", dependencies=[Depends(_authorize)])
async def detokenize(body: DetokenizeRequest, serving: ServingDep):
    serving.check_model(body.model)
    bad = [t for t in body.tokens if not 0 <= t < serving.model_args.vocab_size]
    if bad:
        raise APIError(400, f"token id(s) {bad[:5]} are outside the vocabulary", param="tokens")
    return {"prompt": serving.tokenizer.decode(body.tokens)}


@router.get("/tokenizer_info")
async def tokenizer_info(serving: ServingDep):
    tokenizer = serving.tokenizer
    names = {v: k for k, v in tokenizer.special_tokens.items()}
    return {"tokenizer_class": type(tokenizer).__name__, "vocab_size": tokenizer.vocab_size,
            "bos_token": names.get(tokenizer.bos_id), "eos_token": names.get(tokenizer.eos_id),
            "bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "add_bos_token": tokenizer.add_bos,
            "stop_token_ids": tokenizer.stop_ids, "model_max_length": serving.max_len,
            "chat_template": getattr(tokenizer, "chat_template", None)}


# -- generation --------------------------------------------------------------------------------
@v1.post("/completions")
async def completions(body: CompletionRequest, http: HTTPRequest, serving: ServingDep):
    serving.check_model(body.model)
    if body.suffix:
        raise APIError(400, "suffix is not supported", param="suffix")
    if body.best_of not in (None, body.n):
        raise APIError(400, "best_of is not supported (use n)", param="best_of")
    # off the event loop
    prompts = await run_in_threadpool(_prompt_ids, body.prompt, serving.tokenizer, body.parse_special)
    requests = []
    for ids in prompts:
        max_tokens = body.max_tokens if body.max_tokens is not None else serving.default_max_tokens(len(ids))
        echoed = body.logprobs if body.echo else None  # echo + logprobs score the prompt too
        asked = [k for k in (echoed, body.prompt_logprobs) if k is not None]
        params = body.sampling(max_tokens=max_tokens, logprobs=body.logprobs, prompt_logprobs=max(asked, default=None))
        requests.append(Request(ids, params))
    shaper = responses.Completions(serving.tokenizer, serving.model_name, prompts, body)
    return await _answer(serving, requests, shaper, body, http)


@v1.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, http: HTTPRequest, serving: ServingDep):
    serving.check_model(body.model)
    tokenizer = serving.tokenizer
    messages = _chat(body.messages)
    if body.safe_prompt:
        messages = with_safe_prompt(messages)
    check_tool_messages(messages)
    tools = check_tools(body.tools) if body.tools else []
    mode, name = check_tool_choice(body.tool_choice, tools)
    calls = tool_format(tokenizer) if mode != "none" else None
    constraint = calls.constraint(tools, mode, name, body.parallel_tool_calls) if calls else None
    if constraint is not None and body.constraint() is not None:
        raise APIError(400, "a request with tools cannot also ask for a structured output (or set tool_choice: "
                            "'none')", param="response_format")
    # off the event loop
    ids = await run_in_threadpool(_encode_chat, tokenizer, body, messages, tools if calls else None)
    max_tokens = body.max_completion_tokens or body.max_tokens
    params = body.sampling(max_tokens=max_tokens if max_tokens is not None else serving.default_max_tokens(len(ids)),
                           logprobs=(body.top_logprobs or 0) if body.logprobs else None,
                           prompt_logprobs=body.prompt_logprobs, constraint=constraint)
    shaper = responses.ChatCompletions(tokenizer, serving.model_name, ids, body, calls.parser if calls else None)
    return await _answer(serving, [Request(ids, params)], shaper, body, http)


@v1.post("/moderations")
async def moderations(body: ModerationRequest, http: HTTPRequest, serving: ServingDep):
    """OpenAI's moderation API, answered by the served model's self-reflection (guardrails.py)."""
    serving.check_model(body.model)
    texts = [body.input] if isinstance(body.input, str) else body.input
    if not texts:
        raise APIError(400, "input must not be empty", param="input")
    encode = serving.tokenizer.encode_chat
    prompts = await run_in_threadpool(lambda: [encode(moderation_messages(_unicode(t, "input"))) for t in texts])
    requests = [Request(ids, moderation_params()) for ids in prompts]
    streams = await serving.worker.submit(requests)
    try:
        results = await _collect(streams, http)
    finally:
        serving.worker.release(requests)
    return {"id": f"modr-{uuid.uuid4().hex}", "model": serving.model_name,
            "results": [moderation_result(serving.tokenizer, outputs).to_openai() for outputs in results]}


async def _answer(serving: Serving, requests: list[Request], shaper, body, http: HTTPRequest):
    """The ending both generation routes share: submit the requests (validated there, once), then
    stream SSE chunks or answer with the whole body."""
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options is only allowed with stream: true", param="stream_options")
    streams = await serving.worker.submit(requests)  # before any status line: a full queue is a 503
    http.state.usage = shaper  # its token counts, for the access log
    release = functools.partial(serving.worker.release, requests)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return _sse(shaper.stream(_merge(streams)), include_usage=include_usage, usage=shaper.usage, release=release)
    try:
        return shaper.response(await _collect(streams, http))
    finally:
        release()


async def _collect(streams: list[AsyncIterator[SequenceOutput]], http: HTTPRequest) -> list[list[SequenceOutput]]:
    """Every output of every request; abort them all if the client goes away."""
    async def drain(stream: AsyncIterator[SequenceOutput]) -> list[SequenceOutput]:
        return [out async for out in stream]

    task = asyncio.gather(*(drain(s) for s in streams))
    while not task.done():
        done, _ = await asyncio.wait({task}, timeout=0.5)
        if not done and await http.is_disconnected():
            task.cancel()  # each stream's finally aborts its request in the engine
            raise APIError(499, "client disconnected")
    return task.result()


def _prompt_ids(prompt, tokenizer, special: bool) -> list[list[int]]:
    """The four prompt shapes of /v1/completions -> token-id lists. Text gets the model's BOS and, with
    `special`, its special-token texts parsed (a prompt the client formatted as a chat); token ids are
    taken as given (lm-eval relies on that)."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt must not be empty", param="prompt")
    if isinstance(prompt[0], int):
        prompt = [prompt]
    out = []
    for p in prompt:
        ids = tokenizer.encode(_unicode(p, "prompt"), bos=tokenizer.add_bos, special=special) if isinstance(p, str) \
            else list(p)
        if not ids:
            raise APIError(400, "prompt must not be empty", param="prompt")
        out.append(ids)
    return out


def _unicode(text: str, param: str) -> str:
    """Text for the tokenizer. JSON can carry a lone surrogate ("\\ud800"), which is no Unicode text."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise APIError(400, f"{param} is not valid Unicode: a lone surrogate at character {e.start}",
                       param=param) from None
    return text


def _encode_chat(tokenizer, body: ChatCompletionRequest | TokenizeRequest, messages: list[dict] | None = None,
                 tools: list[dict] | None = None) -> list[int]:
    """The messages of a chat or /tokenize request (or `messages`, already taken from it) as a prompt, in the
    format its fields ask for, with the functions the model may call."""
    if body.add_generation_prompt and body.continue_final_message:
        raise APIError(400, "continue_final_message needs add_generation_prompt: false (the last message is "
                       "continued, no new turn is opened)", param="continue_final_message")
    template = _unicode(body.chat_template, "chat_template") if body.chat_template is not None else None
    messages = _chat(body.messages) if messages is None else messages
    return tokenizer.encode_chat(messages, tools, add_generation_prompt=body.add_generation_prompt,
                                 continue_final_message=body.continue_final_message, chat_template=template)


def _chat(messages: list[ChatMessage]) -> list[dict]:
    """The messages as the tokenizer takes them. A null content (an assistant turn that only called
    tools, as OpenAI clients send it) is an empty one."""
    chat = []
    for i, message in enumerate(messages):
        content = message.content if message.content is not None else ""
        parts = [content] if isinstance(content, str) else [p.get("text") for p in content]
        for text in parts:
            if isinstance(text, str):
                _unicode(text, f"messages.{i}.content")
        chat.append({**message.model_dump(exclude_none=True), "content": content})
    return chat


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


class _EventStream(StreamingResponse):
    """An SSE response that, however it ends, lets go of its requests: a client gone before the body
    started leaves streams that were never read."""

    def __init__(self, body: AsyncIterator[str], release: Callable[[], None]):
        super().__init__(body, media_type="text/event-stream")
        self.release = release

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.release()


def _sse(chunks: AsyncIterator[dict], *, include_usage: bool, usage, release: Callable[[], None]) -> StreamingResponse:
    async def body():
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk)}\n\n"
            if include_usage:
                yield f"data: {json.dumps(usage())}\n\n"
        except Exception as e:  # the 200 is already sent: the error travels as the stream's last event
            if not isinstance(e, (EngineFailure, ShuttingDown)):
                log.exception("stream failed")
            status = 503 if isinstance(e, ShuttingDown) else 500
            message = "internal server error" if status == 500 and not isinstance(e, EngineFailure) else str(e)
            yield f"data: {json.dumps(_error_body(status, message, _error_type(status)))}\n\n"
        yield "data: [DONE]\n\n"

    return _EventStream(body(), release)
