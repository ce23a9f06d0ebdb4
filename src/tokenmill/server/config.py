"""Server options. Like EngineConfig, the field docs become `tokenmill serve --help`."""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenmill.tools.parsers import TOOL_PARSERS


@dataclass(frozen=True)
class ServerConfig:
    host: str = field(default="127.0.0.1", metadata={"help": "address to bind (0.0.0.0: all)"})
    port: int = field(default=8000, metadata={"help": "port to listen on"})
    api_key: str | None = field(
        default=None,
        metadata={
            "help": "require 'Authorization: Bearer KEY' on every route but /, /static/*, "
            "/health, /version and the API docs (env TOKENMILL_API_KEY)"
        },
    )
    max_queue: int = field(
        default=256,
        metadata={
            "help": "sequences that may wait beyond --max-num-seqs; more get 503 + Retry-After"
        },
    )
    served_model_name: list[str] | None = field(
        default=None,
        metadata={"help": "model name(s) clients use (repeatable; default: the model's name)"},
    )
    cors_origins: list[str] | None = field(
        default=None, metadata={"help": "allowed CORS origin (repeatable; '*' for any)"}
    )
    max_request_bytes: int = field(
        default=16 * 1024 * 1024, metadata={"help": "largest request body accepted (else 413)"}
    )
    preprocess_timeout_s: float = field(
        default=10.0,
        metadata={
            "help": "most seconds a request may spend before the engine (waiting for a worker, "
            "rendering the chat template, tokenizing); then 503 + Retry-After if it mostly "
            "waited for a worker, else 413"
        },
    )
    preprocess_workers: int | None = field(
        default=None,
        metadata={
            "help": "threads that tokenize and render chat templates off the event loop "
            "(default: min(4, CPUs))"
        },
    )
    tool_call_parser: str = field(
        default="hermes",
        metadata={
            "help": "reads tool calls out of tool_choice=auto output: hermes "
            "(<tool_call>{json}</tool_call>) | llama3_json (a bare JSON call)"
        },
    )
    uvicorn_log_level: str = field(default="info", metadata={"help": "uvicorn's log level"})

    def __post_init__(self) -> None:
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.max_request_bytes < 1:
            raise ValueError(f"max_request_bytes must be >= 1, got {self.max_request_bytes}")
        if not self.preprocess_timeout_s > 0:
            raise ValueError(f"preprocess_timeout_s must be > 0, got {self.preprocess_timeout_s}")
        if self.tool_call_parser not in TOOL_PARSERS:
            raise ValueError(
                f"tool_call_parser must be one of {', '.join(TOOL_PARSERS)}, "
                f"got {self.tool_call_parser!r}"
            )
        if self.preprocess_workers is not None and self.preprocess_workers < 1:
            raise ValueError(f"preprocess_workers must be >= 1, got {self.preprocess_workers}")
