"""What one client can make the server hold: a request body limit (413) and a bounded queue (429 + Retry-After).

The body limit is an ASGI middleware, so an oversized body is refused before it is read into memory: at once
when Content-Length says so, or as soon as a chunked body passes the limit.
"""

from __future__ import annotations

from starlette.responses import JSONResponse

from comb_jax.serving.protocol import APIError

DEFAULT_MAX_BODY_BYTES = 16 << 20
DEFAULT_MAX_QUEUE = 256
RETRY_AFTER_S = 1


class BodyTooLarge(APIError):
    def __init__(self, limit: int, size: int | None = None):
        got = f"{size} bytes" if size is not None else "more than that"
        super().__init__(413, f"the request body is {got}; this server accepts at most {limit} bytes "
                              "(--max-body-mb)", code="request_too_large")


class QueueFull(APIError):
    """429: every waiting place is taken; the client should come back after `headers['Retry-After']` seconds."""

    def __init__(self, waiting: int, retry_after_s: int = RETRY_AFTER_S):
        super().__init__(429, f"the server is busy: {waiting} requests are waiting already (--max-queue); "
                              f"retry after {retry_after_s} s", code="queue_full")
        self.headers = {"Retry-After": str(retry_after_s)}


class BodyLimit:
    """ASGI middleware: 413 for an HTTP request body over `max_bytes`."""

    def __init__(self, app, max_bytes: int = DEFAULT_MAX_BODY_BYTES):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                return await self._refuse(scope, receive, send,
                                          APIError(400, "the Content-Length header is not a number"))
            if size > self.max_bytes:
                return await self._refuse(scope, receive, send, BodyTooLarge(self.max_bytes, size))
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:  # a chunked body (no Content-Length) that keeps coming
                    raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, counted, send)

    async def _refuse(self, scope, receive, send, error: APIError):
        await JSONResponse(error.body(), status_code=error.status, headers={"Connection": "close"})(scope, receive,
                                                                                                    send)
