"""A bound on request bodies, as pure ASGI middleware (which, unlike Starlette's BaseHTTPMiddleware,
leaves the client's disconnect visible to the routes).

A route reading a body over the bound gets a 413 HTTPException (the app's handlers give it the OpenAI
shape) before the first byte when Content-Length says so, else as soon as the bytes received pass it:
the JSON parser on the event loop never sees more than the bound.
"""

from __future__ import annotations

from fastapi import HTTPException  # FastAPI passes its own through body parsing (a 400 otherwise)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

DEFAULT_MAX_REQUEST_BYTES = 8 * 2**20


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        seen = 0

        async def bounded_receive() -> Message:
            nonlocal seen
            if declared.isdigit() and int(declared) > self.max_bytes:
                raise self._too_large()
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:  # a chunked body, with no Content-Length to look at first
                    raise self._too_large()
            return message

        await self.app(scope, bounded_receive, send)

    def _too_large(self) -> HTTPException:
        return HTTPException(413, f"the request body is over this server's bound of {self.max_bytes} bytes "
                                  "(--max-request-bytes)")
