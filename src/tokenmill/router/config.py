"""Router options; the field docs become `tokenmill router --help`."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, get_type_hints

from tokenmill.router.policy import POLICIES


@dataclass(frozen=True)
class RouterConfig:
    worker: list[str] | None = field(
        default=None, metadata={"help": "a worker's base URL, e.g. http://host:8000 (repeatable)"}
    )
    host: str = field(default="127.0.0.1", metadata={"help": "address to bind (0.0.0.0: all)"})
    port: int = field(default=8000, metadata={"help": "port to listen on"})
    policy: str = field(
        default="cache_aware",
        metadata={"help": f"how a worker is chosen: {' | '.join(POLICIES)}"},
    )
    cache_threshold: float = field(
        default=0.5,
        metadata={
            "help": "cache_aware: the share of a request's text a worker must hold for the "
            "request to follow its prefix"
        },
    )
    balance_abs_tokens: int = field(
        default=4096,
        metadata={
            "help": "cache_aware: a prefix owner whose predicted work exceeds the least-loaded "
            "worker's by more tokens than this (and by --balance-rel) is overloaded"
        },
    )
    balance_abs_requests: int = field(
        default=16,
        metadata={
            "help": "cache_aware: a prefix owner with more outstanding requests than the "
            "least busy worker by more than this (and by --balance-rel) is overloaded"
        },
    )
    balance_rel: float = field(
        default=1.5,
        metadata={"help": "cache_aware: see --balance-abs-tokens/--balance-abs-requests"},
    )
    max_tree_chars: int = field(
        default=1 << 22,
        metadata={"help": "characters of served text the radix tree keeps per worker"},
    )
    chars_per_token: float = field(
        default=4.0, metadata={"help": "characters per prompt token, for predicted work"}
    )
    default_max_tokens: int = field(
        default=256, metadata={"help": "predicted output tokens of a request without max_tokens"}
    )
    health_interval_s: float = field(
        default=5.0, metadata={"help": "seconds between GET /health checks of each worker"}
    )
    health_failures: int = field(
        default=2, metadata={"help": "failed checks in a row that take a worker out of rotation"}
    )
    connect_timeout_s: float = field(
        default=5.0, metadata={"help": "seconds to connect to a worker (then try another)"}
    )
    uvicorn_log_level: str = field(default="warning", metadata={"help": "uvicorn's log level"})

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        for name in ("health_interval_s", "connect_timeout_s", "chars_per_token"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("health_failures", "default_max_tokens", "max_tree_chars"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def router_options(items: list[str]) -> dict[str, Any]:
    """`NAME=VALUE` strings (`serve --router-option`) as RouterConfig keyword arguments."""
    hints = get_type_hints(RouterConfig)
    kinds = {f.name: hints[f.name] for f in fields(RouterConfig)}
    out: dict[str, Any] = {}
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in kinds or name in ("worker", "host", "port", "policy"):
            settable = sorted(set(kinds) - {"worker", "host", "port", "policy"})
            raise ValueError(f"router option must be NAME=VALUE, NAME one of {settable}: {item!r}")
        kind = kinds[name]
        try:
            out[name] = kind(value) if kind in (int, float, str) else value
        except ValueError as e:
            raise ValueError(f"router option {name} must be {kind.__name__}: {value!r}") from e
    return out
