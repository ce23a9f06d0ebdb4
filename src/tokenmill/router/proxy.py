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

import json
import logging
from collections.abc import AsyncIterator

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


async def proxy_request(
    client: httpx.AsyncClient,
    router: Router,
    path: str,
    body: bytes,
    headers: dict[str, str],
    info: RouteInfo,
) -> Response:
    tried: set[str] = set()
    last: Response | None = None
    while True:
        decision = router.route(info, exclude=tried, retry=bool(tried))
        if decision is None:
            break
        worker, ticket = decision.worker, decision.ticket
        tried.add(worker.url)
        try:
            upstream = await client.send(
                client.build_request("POST", worker.url + path, content=body, headers=headers),
                stream=True,
            )
        except httpx.TransportError as e:
            ticket.finish()
            worker.requests["unreachable"] += 1
            router.mark_unhealthy(worker, f"{type(e).__name__}: {e}")
            router.retried(worker)
            continue
        if upstream.status_code >= 500:
            content = await _read_quietly(upstream)
            ticket.finish()
            worker.requests[f"{upstream.status_code // 100}xx"] += 1
            last = Response(
                content,
                status_code=upstream.status_code,
                headers=forward_headers(upstream.headers),
            )
            router.retried(worker)
            logger.info(
                "worker %s answered %d; retrying elsewhere", worker.url, upstream.status_code
            )
            continue
        chunks = upstream.aiter_raw()
        try:
            first = await anext(chunks, b"")
        except httpx.TransportError as e:
            await upstream.aclose()
            ticket.finish()
            worker.requests["dropped"] += 1
            router.mark_unhealthy(worker, f"dropped a response before its first byte: {e}")
            router.retried(worker)
            continue
        ticket.first_byte()
        worker.requests[f"{upstream.status_code // 100}xx"] += 1
        return StreamingResponse(
            _relay(first, chunks, upstream, ticket, info.stream),
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
