"""`tokenmill serve`: load the engine, wrap it in the async engine, run uvicorn."""

from __future__ import annotations

import logging
import os

import uvicorn

from tokenmill.config import EngineConfig
from tokenmill.engine.async_engine import AsyncLLMEngine
from tokenmill.engine.engine import LLMEngine
from tokenmill.server.app import create_app
from tokenmill.server.config import ServerConfig

logger = logging.getLogger(__name__)


def serve(engine_config: EngineConfig, server_config: ServerConfig) -> None:
    cfg = server_config
    api_key = cfg.api_key or os.environ.get("TOKENMILL_API_KEY") or None
    engine = LLMEngine(engine_config)
    async_engine = AsyncLLMEngine(
        engine, max_pending_seqs=engine_config.max_num_seqs + cfg.max_queue
    )
    app = create_app(
        async_engine,
        served_model_names=cfg.served_model_name,
        api_key=api_key,
        cors_origins=cfg.cors_origins or (),
        max_body_bytes=cfg.max_request_bytes,
        preprocess_timeout_s=cfg.preprocess_timeout_s,
        preprocess_workers=cfg.preprocess_workers,
        tool_call_parser=cfg.tool_call_parser,
    )
    url = f"http://{cfg.host}:{cfg.port}"
    logger.warning(
        "serving %s on %s/v1 (OpenAI-compatible); chat page at %s/", engine.model_name, url, url
    )
    # On Ctrl-C, requests still streaming get 5 s; then they are cancelled (and aborted).
    uvicorn.run(
        app,
        host=cfg.host,
        port=cfg.port,
        log_level=cfg.uvicorn_log_level,
        timeout_graceful_shutdown=5,
    )
