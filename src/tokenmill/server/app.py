"""The FastAPI app: OpenAI-compatible routes over an injected AsyncLLMEngine."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse, Response

from tokenmill.engine.async_engine import AsyncLLMEngine
from tokenmill.server import serving_tokenize
from tokenmill.server.chat_page import add_chat_page
from tokenmill.server.errors import error_response, install_error_handlers
from tokenmill.server.metrics import CONTENT_TYPE, ServerMetrics
from tokenmill.server.middleware import RequestGuard, needs_api_key
from tokenmill.server.openapi import Limits, install_openapi
from tokenmill.server.preprocess import DEFAULT_PREPROCESS_TIMEOUT_S
from tokenmill.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from tokenmill.server.serving_chat import create_chat_completion
from tokenmill.server.serving_common import ServerContext
from tokenmill.server.serving_completions import create_completion
from tokenmill.version import __version__

DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024


def create_app(
    engine: AsyncLLMEngine,
    *,
    served_model_names: Sequence[str] | None = None,
    api_key: str | None = None,
    cors_origins: Sequence[str] = (),
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    preprocess_timeout_s: float = DEFAULT_PREPROCESS_TIMEOUT_S,
    preprocess_workers: int | None = None,
    tool_call_parser: str = "hermes",
) -> FastAPI:
    """Builds the app. The engine loop starts with the app (lifespan) and stops with it; the
    engine's StatsListener is replaced by this app's Prometheus metrics."""
    ctx = ServerContext.create(
        engine,
        served_model_names,
        tool_call_parser,
        timeout_s=preprocess_timeout_s,
        num_workers=preprocess_workers,
    )
    metrics = ServerMetrics(ctx.model_name)
    engine.stats_listener = metrics
    metrics.attach(engine)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        try:
            yield
        finally:
            ctx.preprocessor.close()
            await engine.shutdown()

    app = FastAPI(title="tokenmill", version=__version__, lifespan=lifespan)
    app.state.ctx = ctx
    app.state.metrics = metrics
    install_error_handlers(app)
    limits = Limits(
        model_names=list(dict.fromkeys([*ctx.served_model_names, *ctx.model.aliases])),
        vocab_size=ctx.vocab_size,
        max_seq_len=ctx.max_model_len,
        max_pending_seqs=engine.max_pending_seqs,
        needs_api_key=lambda path: api_key is not None and needs_api_key(path),
    )
    install_openapi(app, limits)
    app.add_middleware(RequestGuard, api_key=api_key, max_body_bytes=max_body_bytes)
    if cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(cors_origins),
            allow_methods=["*"],
            allow_headers=["*"],
            allow_credentials="*" not in cors_origins,
        )

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest) -> Response:
        return await create_completion(req, ctx)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest) -> Response:
        return await create_chat_completion(req, ctx)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        created = int(time.time())
        data = [
            {
                "id": name,
                "object": "model",
                "created": created,
                "owned_by": "tokenmill",
                "root": ctx.model.name,
                "max_model_len": ctx.max_model_len,
            }
            for name in ctx.served_model_names
        ]
        return {"object": "list", "data": data}

    @app.get("/health")
    async def health() -> Response:
        if engine.is_healthy:
            return JSONResponse({"status": "ok"})
        reason = "the engine loop is not running"
        down = engine.engine.health_error()
        if down is not None:
            reason = down
        elif engine.error is not None:
            reason = f"the engine loop failed: {engine.error!r}"
        elif engine.is_running:
            reason = f"the engine loop has not stepped for {engine.health_timeout_s:.0f}s"
        return error_response(503, reason, code="engine_unhealthy")

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest) -> Response:
        return await serving_tokenize.tokenize(req, ctx)

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest) -> Response:
        return await serving_tokenize.detokenize(req, ctx)

    add_chat_page(app)
    return app
