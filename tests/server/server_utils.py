"""Helpers for the server tests: a uvicorn server in a background thread over a shared engine,
and a Prometheus scrape parser."""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import uvicorn

from tokenmill.engine.async_engine import AsyncLLMEngine
from tokenmill.engine.engine import LLMEngine
from tokenmill.server.app import create_app


def check_engine_idle(engine: LLMEngine) -> None:
    sched = engine.scheduler
    assert not sched.has_unfinished_requests()
    for group in sched.kv_cache_manager.groups:
        pool = group.pool
        pool.check_integrity()
        assert pool.num_used_blocks == 0, f"{pool.num_used_blocks} KV blocks leaked"
    assert not engine.outputs.states, "output state leaked"


def check_error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    expected_type = "server_error" if status >= 500 else "invalid_request_error"
    assert err["type"] == expected_type
    if param is not None:
        assert err["param"] == param, err
    for leak in ("pydantic", "input_value", "Traceback", "loc", "[type="):
        assert leak not in err["message"], err["message"]
    return err


class Metrics:
    """Scraped Prometheus text; `m(name, **labels)` sums the matching series."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.series: list[tuple[str, dict[str, str], float]] = []
        for line in text.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            key, _, value = line.rpartition(" ")
            name, _, rest = key.partition("{")
            labels = dict(re.findall(r'(\w+)="([^"]*)"', rest))
            self.series.append((name, labels, float(value)))

    def __call__(self, name: str, **labels: str) -> float:
        found = [
            v
            for n, lab, v in self.series
            if n == name and all(lab.get(k) == want for k, want in labels.items())
        ]
        assert found, f"no metric {name} {labels}"
        return sum(found)


class Server:
    """A running app: `url`, `base_url` (for OpenAI clients) and the engines behind it."""

    def __init__(self, engine: LLMEngine, **app_kwargs: Any) -> None:
        max_pending = app_kwargs.pop("max_pending_seqs", None)
        key = app_kwargs.get("api_key")
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}  # for /metrics
        self.engine = engine
        self.async_engine = AsyncLLMEngine(engine, max_pending_seqs=max_pending)
        self.app = create_app(self.async_engine, **app_kwargs)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.base_url = f"{self.url}/v1"
        self.model = engine.model_name
        config = uvicorn.Config(
            self.app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on"
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def start(self) -> None:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            assert self._thread.is_alive(), "uvicorn failed to start"
            assert time.monotonic() < deadline, "uvicorn did not start in 30 s"
            time.sleep(0.02)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=60)
        assert not self._thread.is_alive(), "uvicorn did not stop"

    def metrics(self) -> Metrics:
        r = httpx.get(f"{self.url}/metrics", headers=self.headers, timeout=30)
        assert r.status_code == 200, r.text
        return Metrics(r.text)

    def wait_idle(self, timeout: float = 60) -> Metrics:
        """Waits until no sequence is pending and no KV block is used; returns the metrics."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            idle = (
                m("tokenmill_kv_cache_used_blocks") == 0
                and m("tokenmill_num_requests_running") == 0
                and m("tokenmill_num_requests_waiting") == 0
                and m("tokenmill_num_requests_pending") == 0
            )
            if idle:
                return m
            assert time.monotonic() < deadline, f"server not idle after {timeout}s: {m}"
            time.sleep(0.05)


@contextmanager
def running_server(engine: LLMEngine, **app_kwargs: Any) -> Iterator[Server]:
    server = Server(engine, **app_kwargs)
    server.start()
    try:
        yield server
    finally:
        server.stop()
    check_engine_idle(engine)
