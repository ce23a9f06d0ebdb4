"""The workers behind the router: health, counters, and the load each one carries.

A worker's load is its outstanding requests and its predicted outstanding work in tokens: the
prompt tokens not yet prefilled (those past its cached prefix, as the router estimates it) plus
the output tokens not yet generated. A `Ticket` holds one request's share and gives it back as
the request advances: the prompt part at the first byte (the worker has prefilled by then), one
output token per streamed event, the rest at the end.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass(eq=False)
class Worker:
    url: str  # base URL, no trailing slash
    healthy: bool = True
    outstanding: int = 0  # requests in flight
    work: int = 0  # predicted tokens still to compute
    consecutive_failures: int = 0
    requests: Counter[str] = field(default_factory=Counter)  # outcome -> count

    @property
    def name(self) -> str:
        return self.url


class Ticket:
    """One request's load on one worker; `finish` is idempotent."""

    def __init__(self, worker: Worker, prompt_work: int, output_work: int) -> None:
        self.worker = worker
        self.prompt_left = max(0, prompt_work)
        self.output_left = max(0, output_work)
        self._open = True
        worker.outstanding += 1
        worker.work += self.prompt_left + self.output_left

    def first_byte(self) -> None:
        self.worker.work -= self.prompt_left
        self.prompt_left = 0

    def tokens(self, n: int) -> None:
        n = min(n, self.output_left)
        self.worker.work -= n
        self.output_left -= n

    def finish(self) -> None:
        if self._open:
            self._open = False
            self.worker.work -= self.prompt_left + self.output_left
            self.prompt_left = self.output_left = 0
            self.worker.outstanding -= 1


class WorkerPool:
    def __init__(self, urls: list[str]) -> None:
        if not urls:
            raise ValueError("at least one worker URL is needed")
        normalized = [u.rstrip("/") for u in urls]
        for u in normalized:
            if not u.startswith(("http://", "https://")):
                raise ValueError(f"worker URL must start with http:// or https://, got {u!r}")
        if len(set(normalized)) != len(normalized):
            raise ValueError(f"worker URLs repeat: {urls}")
        self.workers = [Worker(u) for u in normalized]

    def healthy(self) -> list[Worker]:
        return [w for w in self.workers if w.healthy]

    def by_url(self, url: str) -> Worker:
        for w in self.workers:
            if w.url == url:
                return w
        raise KeyError(url)
