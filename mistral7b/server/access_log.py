"""One log line per request, and its `X-Request-Id`, as pure ASGI middleware (it sees the end of a
stream, and leaves the client's disconnect visible to the routes).

The id is the client's `X-Request-Id` when it sends one, else a new one; it comes back in the
response's headers. A generation route leaves its token counts in the request's state as `usage`
(an object with prompt_tokens and completion_tokens), read once the response is sent.
"""

from __future__ import annotations

import logging
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("mistral7b.access")


class AccessLog:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.monotonic()
        request_id = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1") or uuid.uuid4().hex
        state = scope.setdefault("state", {})
        status = 500  # what the client gets if the app fails before its status line

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode("latin-1"))]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            usage = state.get("usage")
            tokens = (f" prompt_tokens={usage.prompt_tokens} completion_tokens={usage.completion_tokens}"
                      if usage is not None else "")
            log.info("%s %s %d%s latency=%.3fs request_id=%s", scope["method"], scope["path"], status, tokens,
                     time.monotonic() - started, request_id)
