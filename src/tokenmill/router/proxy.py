"""Forwarding one request to a worker, with retry before the first byte.

A request goes to the worker the router picks; if that worker cannot be reached, fails before
its response starts (a connection error, a 5xx, a connection dropped before the first body
byte), the request is sent again to another healthy worker it has not tried. Once a body byte
has been passed on to the client the request is that worker's: a failure then ends the
client's stream. A worker that cannot be reached leaves the rotation until a health check
brings it back. The client's disconnect closes the upstream response, which aborts the request
on the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import anyio
import httpx
from starlette.responses import JSONResponse, Response, StreamingResponse

from tokenmill.router.request_info import RouteInfo
from tokenmill.router.routing import Router
from tokenmill.router.workers import Ticket

logger = logging.getLogger(__name__)

# Not forwarded either way: they describe one hop, or the body the proxy re-frames.
_HOP_HEADERS = {
    "host",
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
}


def forward_headers(headers: httpx.Headers | dict[str, str] | object) -> dict[str, str]:
    items = headers.items() if hasattr(headers, "items") else []
    return {k: v for k, v in items if k.lower() not in _HOP_HEADERS}


def error_json(status: int, message: str, code: str) -> JSONResponse:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return JSONResponse(body, status_code=status)


@dataclass
class _Started:
    """A worker's response whose first body bytes have arrived (or that has no body)."""

    upstream: httpx.Response
    chunks: AsyncIterator[bytes]
    first: bytes


class _Failed(Exception):
    """The worker failed before the first byte; `response` is its 5xx, if it answered one."""

    def __init__(self, outcome: str, why: str, response: Response | None = None) -> None:
        super().__init__(why)
        self.outcome = outcome
        self.response = response


async def _start(
    client: httpx.AsyncClient, url: str, body: bytes, headers: dict[str, str]
) -> _Started:
    try:
        upstream = await client.send(
            client.build_request("POST", url, content=body, headers=headers), stream=True
        )
    except httpx.TransportError as e:
        raise _Failed("unreachable", f"{type(e).__name__}: {e}") from e
    if upstream.status_code >= 500:
        content = await _read_quietly(upstream)
        answer = Response(content, upstream.status_code, headers=forward_headers(upstream.headers))
        raise _Failed(
            f"{upstream.status_code // 100}xx", f"answered {upstream.status_code}", answer
        )
    chunks = upstream.aiter_raw()
    try:
        first = await anext(chunks, b"")
    except httpx.TransportError as e:
        await upstream.aclose()
        raise _Failed("dropped", f"dropped a response before its first byte: {e}") from e
    except BaseException:  # cancelled: the client went away
        await upstream.aclose()
        raise
    return _Started(upstream, chunks, first)


async def proxy_request(
    client: httpx.AsyncClient,
    router: Router,
    path: str,
    body: bytes,
    headers: dict[str, str],
    info: RouteInfo,
    client_gone: asyncio.Future[None] | None = None,
) -> Response:
    """Sends the request to the router's pick, and to further workers while they fail before
    the first byte. If `client_gone` completes first, the attempt is cancelled (its connection
    closed, which aborts the request on the worker) and nothing is answered."""
    tried: set[str] = set()
    last: Response | None = None
    while True:
        decision = router.route(info, exclude=tried, retry=bool(tried))
        if decision is None:
            break
        worker, ticket = decision.worker, decision.ticket
        tried.add(worker.url)
        attempt = asyncio.ensure_future(_start(client, worker.url + path, body, headers))
        try:
            if client_gone is not None:
                await asyncio.wait({attempt, client_gone}, return_when=asyncio.FIRST_COMPLETED)
                if not attempt.done():
                    attempt.cancel()
                    with contextlib.suppress(asyncio.CancelledError, _Failed):
                        await attempt
                    ticket.finish()
                    worker.requests["client_gone"] += 1
                    return Response(status_code=499)
            started = await attempt
        except _Failed as e:
            ticket.finish()
            worker.requests[e.outcome] += 1
            if e.response is None:
                router.mark_unhealthy(worker, str(e))
            else:
                last = e.response
                logger.info("worker %s %s; retrying elsewhere", worker.url, e)
            router.retried(worker)
            continue
        ticket.first_byte()
        upstream = started.upstream
        worker.requests[f"{upstream.status_code // 100}xx"] += 1
        return StreamingResponse(
            _relay(started.first, started.chunks, upstream, ticket, info.stream),
            status_code=upstream.status_code,
            headers=forward_headers(upstream.headers),
        )
    if last is not None:
        return last
    return error_json(503, "no healthy worker could take the request", "no_healthy_worker")


async def _relay(
    first: bytes,
    chunks: AsyncIterator[bytes],
    upstream: httpx.Response,
    ticket: Ticket,
    stream: bool,
) -> AsyncIterator[bytes]:
    try:
        if first:
            if stream:
                ticket.tokens(_events(first))
            yield first
        async for chunk in chunks:
            if stream:
                ticket.tokens(_events(chunk))
            yield chunk
    except httpx.TransportError as e:
        # Bytes already went out: the client sees its stream end early.
        logger.warning("worker %s failed mid-response: %s", ticket.worker.url, e)
        ticket.worker.requests["broken"] += 1
    finally:
        ticket.finish()
        # Shielded: on a client disconnect this runs cancelled, and the worker must still see
        # its connection close (that aborts the request there).
        with anyio.CancelScope(shield=True):
            await upstream.aclose()


def _events(chunk: bytes) -> int:
    """SSE events in a chunk, about one output token each (an approximation)."""
    return chunk.count(b"data: ")


async def _read_quietly(upstream: httpx.Response) -> bytes:
    try:
        return await upstream.aread()
    except httpx.TransportError:
        return json.dumps({"error": {"message": "worker failed", "type": "server_error"}}).encode()
    finally:
        await upstream.aclose()
