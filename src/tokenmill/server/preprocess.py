"""Request preprocessing off the event loop, under a deadline, behind a cheap length bound.

Tokenizing and chat-template rendering run in a small thread pool: `tokenizers` releases the GIL
while it encodes (Tokenizer.encode uses its batch call), and Jinja rendering is short, so the
event loop keeps serving streams and /health meanwhile. Each request gets one deadline
(`--preprocess-timeout-s`) for waiting for a worker plus the work; past it the client gets

- 503 + Retry-After ("server_overloaded") when most of that time went to waiting for a worker:
  the server is busy and the same request may well pass later;
- 413 ("preprocess_timeout") when most of it went to the request's own work: retrying the same
  text cannot help, and clients do not retry a 4xx.

A worker that is already tokenizing cannot be interrupted; it finishes and its result is
dropped. That work is bounded, because before any of it the cheap bound (engine/token_bounds)
turns away texts that cannot fit: a 10 MB prompt gets its 400 in milliseconds, untokenized.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from starlette.responses import Response

from tokenmill.engine.tokenizer import Tokenizer
from tokenmill.server.errors import APIError

T = TypeVar("T")

DEFAULT_PREPROCESS_TIMEOUT_S = 10.0
MAX_DEFAULT_WORKERS = 4
# /tokenize has no context limit of its own; it accepts texts of at most this many contexts.
TOKENIZE_MAX_CONTEXTS = 4


class Preprocessor:
    def __init__(
        self,
        tokenizer: Tokenizer,
        max_model_len: int,
        *,
        timeout_s: float = DEFAULT_PREPROCESS_TIMEOUT_S,
        num_workers: int | None = None,
        allow_special_in_content: bool = False,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"preprocess_timeout_s must be > 0, got {timeout_s}")
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.timeout_s = timeout_s
        self.allow_special_in_content = allow_special_in_content
        self.num_workers = num_workers or min(MAX_DEFAULT_WORKERS, os.cpu_count() or 1)
        self.bound = tokenizer.token_bound  # computed now, not by the first request on the loop
        self._pool = ThreadPoolExecutor(self.num_workers, thread_name_prefix="tokenmill-preproc")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def min_tokens(self, text: str) -> int:
        """A lower bound on the tokens of `text`, in O(bytes) without tokenizing (0: unknown)."""
        return 0 if self.bound is None else self.bound.min_tokens(text)

    @property
    def tokenize_limit(self) -> int:
        return TOKENIZE_MAX_CONTEXTS * self.max_model_len

    def check_tokenize_limit(self, text: str, param: str) -> None:
        num = self.min_tokens(text)
        if num > self.tokenize_limit:
            raise APIError(
                400,
                f"{param} has at least {num} tokens; /tokenize accepts at most "
                f"{self.tokenize_limit} ({TOKENIZE_MAX_CONTEXTS} times the model's maximum "
                f"context length of {self.max_model_len} tokens)",
                param,
                code="tokenize_limit_exceeded",
            )

    async def run(self, fn: Callable[[], T], param: str | None = None) -> T:
        """`fn()` in a worker thread, within the deadline. Cancelling the caller (a client
        disconnect) drops the job if it has not started."""
        submitted = time.monotonic()
        started: list[float] = []

        def job() -> T:
            started.append(time.monotonic())
            return fn()

        future = self._pool.submit(job)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), self.timeout_s)
        except asyncio.TimeoutError:
            raise self._expired(submitted, started[0] if started else None, param) from None

    def _expired(self, submitted: float, started: float | None, param: str | None) -> APIError:
        now = time.monotonic()
        limit = f"{self.timeout_s:g}s"
        if started is None or started - submitted > now - started:
            waited = (now if started is None else started) - submitted
            return APIError(
                503,
                f"the server is busy: this request waited {waited:.1f}s for a preprocessing "
                f"worker (limit {limit}); retry later",
                code="server_overloaded",
                headers={"Retry-After": "1"},
            )
        work, advice = "preprocessing this request (chat template and tokenizing)", "less text"
        if param is not None and param.startswith(("structured_outputs", "response_format")):
            work, advice = "compiling this request's output grammar", "a simpler schema or grammar"
        return APIError(
            413,
            f"{work} took longer than the server's limit of {limit}; send {advice}",
            param,
            code="preprocess_timeout",
        )


def json_response(body: dict[str, Any]) -> Response:
    """A JSON response rendered here (call it in a worker for large bodies: FastAPI would walk a
    returned dict element by element on the event loop)."""
    data = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
    return Response(data, media_type="application/json")
