"""The router's ASGI app: OpenAI routes proxied to workers, health checks, /metrics.

`create_router_app(config)` builds it; tests pass their own `httpx.AsyncClient` (whose
transports may be in-process apps). The health loop checks every worker each
`health_interval_s`: `health_failures` failed checks in a row take one out of the rotation (a
request that cannot reach it does at once), one good check brings it back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tokenmill.router.config import RouterConfig
from tokenmill.router.metrics import CONTENT_TYPE, render
from tokenmill.router.policy import make_policy
from tokenmill.router.proxy import error_json, forward_headers, proxy_request
from tokenmill.router.radix import ApproxRadixTree
from tokenmill.router.request_info import route_info
from tokenmill.router.routing import Router
from tokenmill.router.workers import Worker, WorkerPool

logger = logging.getLogger(__name__)


def build_router(config: RouterConfig) -> Router:
    pool = WorkerPool(list(config.worker or []))
    policy = make_policy(
        config.policy,
        config.cache_threshold,
        config.balance_abs_tokens,
        config.balance_rel,
        config.balance_abs_requests,
    )
    return Router(pool, policy, ApproxRadixTree(config.max_tree_chars))


async def check_worker(
    client: httpx.AsyncClient, router: Router, worker: Worker, failures: int
) -> None:
    try:
        r = await client.get(f"{worker.url}/health", timeout=5.0)
        ok = r.status_code == 200
        why = f"GET /health answered {r.status_code}"
    except httpx.TransportError as e:
        ok, why = False, f"GET /health failed: {type(e).__name__}"
    if ok:
        router.mark_healthy(worker)
        return
    worker.consecutive_failures += 1
    if worker.consecutive_failures >= failures:
        router.mark_unhealthy(worker, why)


async def check_all(client: httpx.AsyncClient, router: Router, failures: int) -> None:
    await asyncio.gather(*(check_worker(client, router, w, failures) for w in router.pool.workers))


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body has been read: nothing else can come)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_router_app(config: RouterConfig, client: httpx.AsyncClient | None = None) -> Starlette:
    router = build_router(config)
    owns_client = client is None
    if client is None:
        # No read timeout (a generation takes as long as it takes; health checks have their
        # own) and no connection cap (the workers' queues bound the load, and a full pool
        # must not hold back health checks).
        client = httpx.AsyncClient(
            timeout=httpx.Timeout(None, connect=config.connect_timeout_s),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=256),
        )
    http = client

    async def health_loop() -> None:
        while True:
            await asyncio.sleep(config.health_interval_s)
            try:
                await check_all(http, router, config.health_failures)
            except Exception:  # the loop must outlive any one bad check
                logger.exception("health check round failed")

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        await check_all(http, router, 1)
        task = asyncio.create_task(health_loop())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            if owns_client:
                await http.aclose()

    async def generate(request: Request) -> Response:
        body = await request.body()
        try:
            parsed: Any = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            parsed = None  # the worker answers the 400
        info = route_info(
            request.url.path,
            parsed if isinstance(parsed, dict) else {},
            chars_per_token=config.chars_per_token,
            default_max_tokens=config.default_max_tokens,
        )
        headers = forward_headers(request.headers)
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            return await proxy_request(http, router, request.url.path, body, headers, info, gone)
        finally:
            gone.cancel()  # a streaming response listens for the disconnect itself

    async def passthrough(request: Request) -> Response:
        """Requests with no prefix to follow (models, tokenize, pages): the least-loaded healthy
        worker that answers below 500."""
        body = await request.body()
        for worker in sorted(router.pool.healthy(), key=lambda w: (w.work, w.outstanding)):
            try:
                r = await http.request(
                    request.method,
                    worker.url + request.url.path,
                    content=body,
                    headers=forward_headers(request.headers),
                )
            except httpx.TransportError as e:
                router.mark_unhealthy(worker, f"{type(e).__name__}: {e}")
                continue
            if r.status_code < 500:
                return Response(r.content, r.status_code, headers=forward_headers(r.headers))
        return error_json(503, "no healthy worker could take the request", "no_healthy_worker")

    async def health(_: Request) -> Response:
        healthy = len(router.pool.healthy())
        if healthy:
            return JSONResponse({"status": "ok", "healthy_workers": healthy})
        return error_json(503, "no healthy worker", "no_healthy_worker")

    async def metrics(_: Request) -> Response:
        return Response(render(router), media_type=CONTENT_TYPE)

    routes = [
        Route("/v1/completions", generate, methods=["POST"]),
        Route("/v1/chat/completions", generate, methods=["POST"]),
        Route("/v1/models", passthrough, methods=["GET"]),
        Route("/version", passthrough, methods=["GET"]),
        Route("/tokenize", passthrough, methods=["POST"]),
        Route("/detokenize", passthrough, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        # CORS preflights, the chat page, its static files and the API docs: any worker's
        Route("/v1/completions", passthrough, methods=["OPTIONS"]),
        Route("/v1/chat/completions", passthrough, methods=["OPTIONS"]),
        Route("/{path:path}", passthrough, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.router = router
    return app
