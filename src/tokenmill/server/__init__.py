"""OpenAI-compatible HTTP server: `create_app(AsyncLLMEngine)`, or `tokenmill serve`."""

from __future__ import annotations

from typing import Any

__all__ = ["ServerConfig", "create_app", "serve"]


def __getattr__(name: str) -> Any:
    # The app pulls in fastapi; import it lazily so `tokenmill generate --help` stays fast.
    if name == "create_app":
        from tokenmill.server.app import create_app

        return create_app
    if name == "serve":
        from tokenmill.server.launch import serve

        return serve
    if name == "ServerConfig":
        from tokenmill.server.config import ServerConfig

        return ServerConfig
    raise AttributeError(name)
