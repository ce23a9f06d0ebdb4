"""`tokenmill router` and `tokenmill serve --data-parallel-size N`: uvicorn over the router app."""

from __future__ import annotations

import dataclasses
import logging
import os

import uvicorn

from tokenmill.router.app import create_router_app
from tokenmill.router.config import RouterConfig
from tokenmill.router.replicas import ReplicaSet

logger = logging.getLogger(__name__)


def run_router(config: RouterConfig) -> None:
    app = create_router_app(config)
    logger.warning(
        "routing http://%s:%d/v1 over %d workers (%s)",
        config.host,
        config.port,
        len(config.worker or []),
        config.policy,
    )
    uvicorn.run(
        app,
        host=config.host,
        port=config.port,
        log_level=config.uvicorn_log_level,
        timeout_graceful_shutdown=5,
    )


def serve_data_parallel(
    serve_args: list[str],
    data_parallel_size: int,
    num_threads: int | None,
    config: RouterConfig,
    startup_timeout_s: float = 900.0,
) -> None:
    """Starts the replicas (each `tokenmill serve` with `serve_args`), waits for all of them,
    then serves the router on the config's host and port until interrupted."""
    total = num_threads or os.cpu_count() or 1
    replicas = ReplicaSet(serve_args, data_parallel_size, total)
    replicas.start()
    try:
        try:
            replicas.wait_healthy(startup_timeout_s)
        except RuntimeError as e:
            logger.error("%s", e)
            raise SystemExit(1) from e
        run_router(dataclasses.replace(config, worker=replicas.urls))
    finally:
        replicas.stop()
