"""Router test helpers: any ASGI app under uvicorn in a thread, a fake OpenAI worker, and a
concurrent chat workload runner.

The fake worker speaks just enough of the API for routing tests: completions and chat
completions (JSON or SSE, one event per "token"), /health, /v1/models, and a prefix cache over
the prompt text in blocks of 16 characters whose hits it counts like a real server counts
prompt tokens. It can be told to wait before answering, to answer 5xx, or to go unhealthy.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

BLOCK = 16


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class AppThread:
    """`app` served by uvicorn on a free localhost port in a daemon thread."""

    def __init__(self, app: Any, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            lifespan="on",
            timeout_graceful_shutdown=1,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> AppThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive(), "uvicorn failed to start"
            assert time.monotonic() < deadline, "uvicorn did not start in 30 s"
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "uvicorn did not stop"

    def kill(self) -> None:
        """Stops at once: open connections are dropped, requests in flight get no answer."""
        self.server.force_exit = True
        self.stop()

    def __enter__(self) -> AppThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def prompt_text(body: dict[str, Any]) -> str:
    if "messages" in body:
        return "".join(str(m.get("content")) for m in body["messages"])
    return str(body.get("prompt", ""))


class FakeWorker:
    def __init__(self, name: str, delay_s: float = 0.0, token_delay_s: float = 0.0) -> None:
        self.name = name
        self.delay_s = delay_s
        self.token_delay_s = token_delay_s
        self.healthy = True
        self.fail_with: int | None = None  # answer this status to generation requests
        self.blocks: set[str] = set()  # cached block-aligned prefixes
        self.queries = 0  # prompt characters looked up
        self.hits = 0  # prompt characters found cached
        self.requests = 0
        self.completed = 0
        self.aborted = 0
        self.app = Starlette(
            routes=[
                Route("/v1/completions", self.generate, methods=["POST"]),
                Route("/v1/chat/completions", self.generate, methods=["POST"]),
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/health", self.health, methods=["GET"]),
            ]
        )

    def cache(self, text: str) -> int:
        """Looks the text up block by block, caches it, returns the cached characters."""
        cached = 0
        while cached + BLOCK <= len(text) and text[: cached + BLOCK] in self.blocks:
            cached += BLOCK
        cached = min(cached, max(0, len(text) - 1))  # one character is always computed
        for end in range(BLOCK, len(text) + 1, BLOCK):
            self.blocks.add(text[:end])
        self.queries += len(text)
        self.hits += cached
        return cached

    async def generate(self, request: Request) -> Response:
        body = await request.json()
        self.requests += 1
        deadline = time.monotonic() + self.delay_s
        while time.monotonic() < deadline:  # like a real server, a gone client aborts
            if await request.is_disconnected():
                self.aborted += 1
                return Response(status_code=499)
            await asyncio.sleep(0.01)
        if self.fail_with is not None:
            return JSONResponse({"error": {"message": "failing"}}, status_code=self.fail_with)
        text = prompt_text(body)
        cached = self.cache(text)
        n = int(body.get("max_tokens") or 4)
        usage = {
            "prompt_tokens": len(text),
            "completion_tokens": n,
            "prompt_tokens_details": {"cached_tokens": cached},
        }
        if not body.get("stream"):
            self.completed += 1
            return JSONResponse({"worker": self.name, "text": "x" * n, "usage": usage})

        async def events() -> AsyncIterator[bytes]:
            done = False
            try:
                for i in range(n):
                    if self.token_delay_s:
                        await asyncio.sleep(self.token_delay_s)
                    yield f"data: {json.dumps({'worker': self.name, 'i': i})}\n\n".encode()
                yield f"data: {json.dumps({'usage': usage})}\n\ndata: [DONE]\n\n".encode()
                done = True
                self.completed += 1
            finally:
                if not done:  # the client went away mid-stream
                    self.aborted += 1

        return StreamingResponse(events(), media_type="text/event-stream")

    async def models(self, _: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": "fake", "owner": self.name}]})

    async def health(self, _: Request) -> Response:
        if self.healthy:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"error": {"message": "unhealthy"}}, status_code=503)


def run_workload(url: str, bodies: list[dict[str, object]], concurrency: int = 8) -> None:
    async def main() -> None:
        sem = asyncio.Semaphore(concurrency)
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:

            async def one(body: dict[str, object]) -> None:
                async with sem:
                    r = await client.post("/v1/chat/completions", json=body)
                    assert r.status_code == 200, r.text

            await asyncio.gather(*(one(b) for b in bodies))

    asyncio.run(main())
