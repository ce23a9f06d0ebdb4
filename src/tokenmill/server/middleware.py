"""The request guard, a pure ASGI middleware in front of every route:

- 401 without the right `Authorization: Bearer <key>` (when a key is set) on every path but the
  open ones: the web page (/ and /static/*), /health, /version and the API docs. /tokenize,
  /detokenize and /metrics need the key like /v1/*: they cost server time or reveal traffic;
- 413 for a body over the limit (by Content-Length, or counted while reading a chunked body);
- client disconnect: the body is read up front, then the real `receive` is watched while the
  route runs; when the client goes away the route's task is cancelled, which aborts its engine
  requests (stream or not) and frees their KV blocks at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokenmill.server.errors import error_bytes

logger = logging.getLogger(__name__)

OPEN_PATHS = frozenset(
    {"/", "/health", "/version", "/favicon.ico", "/docs", "/redoc", "/openapi.json"}
)
OPEN_PREFIXES = ("/static", "/docs/")


def needs_api_key(path: str) -> bool:
    """The paths that require the API key, when the server has one."""
    return path not in OPEN_PATHS and not path.startswith(OPEN_PREFIXES)


class RequestGuard:
    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int) -> None:
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.api_key is not None and needs_api_key(scope["path"]):
            auth = headers.get("authorization", "")
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                token.strip().encode(), self.api_key.encode()
            ):
                await _respond(
                    send, 401, "Incorrect or missing API key (send Authorization: Bearer <key>)",
                    "invalid_api_key", {"www-authenticate": "Bearer"},
                )  # fmt: skip
                return
        too_large = (
            f"request body is larger than the limit of {self.max_body_bytes} bytes",
            "request_too_large",
        )
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            await _respond(send, 413, *too_large)
            return
        body = bytearray()
        more = True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
            if len(body) > self.max_body_bytes:
                await _respond(send, 413, *too_large)
                return
        await self._run_watched(scope, receive, send, bytes(body))

    async def _run_watched(self, scope: Scope, receive: Receive, send: Send, body: bytes) -> None:
        disconnected = asyncio.Event()
        body_sent = False

        async def app_receive() -> Message:
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await disconnected.wait()
            return {"type": "http.disconnect"}

        async def watch() -> None:
            while True:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    disconnected.set()
                    return

        app_task = asyncio.ensure_future(self.app(scope, app_receive, send))
        watch_task = asyncio.ensure_future(watch())
        try:
            await asyncio.wait({app_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not app_task.done():
                # the client went away (or this task was cancelled): stop the route
                app_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await app_task
                logger.debug("client disconnected from %s; request cancelled", scope["path"])
            watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch_task
        if not app_task.cancelled():
            app_task.result()  # re-raise what the app raised


async def _respond(
    send: Send, status: int, message: str, code: str, headers: dict[str, str] | None = None
) -> None:
    body = error_bytes(status, message, code)
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body, "more_body": False})
