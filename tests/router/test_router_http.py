"""The router over fake workers on real sockets: prefix routing and hit rate against one worker
and round-robin, streaming passthrough, retry before the first byte (unreachable, 5xx, killed
mid-run), health checks, /metrics."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import httpx

from tokenmill.router.app import create_router_app
from tokenmill.router.config import RouterConfig

sys.path.insert(0, str(Path(__file__).parent))
from router_utils import AppThread, FakeWorker, free_port, run_workload  # noqa: E402

sys.path.insert(0, str(Path(__file__).parents[1] / "server"))
from server_utils import Metrics  # noqa: E402

SYSTEMS = [f"You are assistant number {i}. " + f"Rule {i}: be precise and kind. " * 30
           for i in range(4)]  # fmt: skip


@contextmanager
def routed(
    workers: list[FakeWorker], extra_urls: tuple[str, ...] = (), **cfg: object
) -> Iterator[tuple[str, list[AppThread]]]:
    threads = [AppThread(w.app).start() for w in workers]
    options: dict[str, object] = {"health_interval_s": 0.1, "health_failures": 1, **cfg}
    config = RouterConfig(
        worker=[t.url for t in threads] + list(extra_urls),
        **options,  # type: ignore[arg-type]
    )
    router = AppThread(create_router_app(config)).start()
    try:
        yield router.url, threads
    finally:
        router.stop()
        for t in threads:
            if t.thread.is_alive():
                t.stop()


def shared_prefix_workload() -> list[dict[str, object]]:
    """4 system prompts x 32 questions in a seeded random order (interleaved, round-robin
    would keep each system prompt on one worker by accident)."""
    bodies = [
        {"messages": [{"role": "system", "content": s},
                      {"role": "user", "content": f"Question {q}: what is {q} squared?"}],
         "max_tokens": 2}
        for q in range(32) for s in SYSTEMS
    ]  # fmt: skip
    random.Random(0).shuffle(bodies)
    return bodies


def hit_rate(workers: list[FakeWorker]) -> float:
    return sum(w.hits for w in workers) / sum(w.queries for w in workers)


def test_cache_aware_hit_rate_matches_one_worker_and_beats_round_robin() -> None:
    rates = {}
    for policy, n in (("cache_aware", 1), ("cache_aware", 2), ("round_robin", 2)):
        workers = [FakeWorker(f"w{i}") for i in range(n)]
        with routed(workers, policy=policy) as (url, _):
            run_workload(url, shared_prefix_workload())
            m = Metrics(httpx.get(f"{url}/metrics").text)
        rates[(policy, n)] = hit_rate(workers)
        assert m("tokenmill_router_requests_total", outcome="2xx") == 128
        if n == 2:  # both workers served
            assert all(w.completed > 0 for w in workers), [w.completed for w in workers]
        if (policy, n) == ("cache_aware", 2):
            # every system prompt stayed on one worker: each worker saw 2 of them whole
            assert m("tokenmill_router_routing_decisions_total", reason="prefix") >= 120
    one, cache_aware, rr = (
        rates[("cache_aware", 1)],
        rates[("cache_aware", 2)],
        rates[("round_robin", 2)],
    )
    assert cache_aware >= 0.9 * one, rates
    assert cache_aware > rr, rates


def test_streaming_passes_through_event_by_event() -> None:
    worker = FakeWorker("w0", token_delay_s=0.05)
    with routed([worker]) as (url, _), httpx.Client(base_url=url, timeout=30) as client:
        body = {"prompt": "hello", "max_tokens": 8, "stream": True}
        start = time.monotonic()
        first_at = None
        lines = []
        with client.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            for line in r.iter_lines():
                if line and first_at is None:
                    first_at = time.monotonic() - start
                lines.append(line)
        total = time.monotonic() - start
        events = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
        assert [e["i"] for e in events if "i" in e] == list(range(8))
        assert lines[-2] == "data: [DONE]" or lines[-1] == "data: [DONE]"
        assert first_at is not None and first_at < total - 0.2  # not buffered to the end


def test_retry_past_an_unreachable_worker_and_a_5xx_worker() -> None:
    good, failing, dying = FakeWorker("good"), FakeWorker("failing"), FakeWorker("dying")
    failing.fail_with = 503
    # no health check runs after the first: requests find the dead worker themselves
    with routed([failing, good, dying], policy="round_robin", health_interval_s=60) as (
        url,
        threads,
    ):
        threads[2].kill()
        dead = threads[2].url
        for i in range(9):
            r = httpx.post(f"{url}/v1/completions", json={"prompt": f"p{i}", "max_tokens": 1})
            assert r.status_code == 200 and r.json()["worker"] == "good", r.text
        m = Metrics(httpx.get(f"{url}/metrics").text)
        assert m("tokenmill_router_worker_healthy", worker=dead) == 0
        assert m("tokenmill_router_retries_total", worker=dead) >= 1
        assert m("tokenmill_router_retries_total", worker=threads[0].url) >= 1
        assert m("tokenmill_router_requests_total", worker=threads[0].url, outcome="5xx") >= 1
        # every worker failing: the last 5xx comes back as it was
        threads[1].kill()
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 1})
        assert r.status_code == 503
    nobody = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with routed([], extra_urls=(nobody,)) as (url, _):
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "x"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "no_healthy_worker"
        assert httpx.get(f"{url}/health").status_code == 503


def test_killing_a_worker_mid_run_loses_no_request_before_its_first_byte() -> None:
    slow, fast = FakeWorker("slow", delay_s=60.0), FakeWorker("fast", delay_s=0.05)
    with routed([slow, fast], policy="round_robin") as (url, threads):
        results: list[httpx.Response] = []

        async def main() -> None:
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:

                async def one(i: int) -> None:
                    body = {"prompt": f"p{i}", "max_tokens": 3, "stream": i % 2 == 0}
                    results.append(await client.post("/v1/completions", json=body))

                await asyncio.gather(*(one(i) for i in range(16)))

        def kill_once_busy() -> None:  # slow holds 4 requests it will never answer
            deadline = time.monotonic() + 30
            while slow.requests < 4 and time.monotonic() < deadline:
                time.sleep(0.01)
            threads[0].kill()

        killer = threading.Thread(target=kill_once_busy)
        killer.start()
        asyncio.run(main())
        killer.join()
        assert len(results) == 16
        assert all(r.status_code == 200 for r in results), [r.text for r in results]
        assert slow.requests >= 4 and slow.completed == 0 and fast.completed == 16
        m = Metrics(httpx.get(f"{url}/metrics").text)
        assert m("tokenmill_router_retries_total", worker=threads[0].url) >= 1
        assert m("tokenmill_router_worker_healthy", worker=threads[0].url) == 0


def worker_healthy(url: str, worker: str) -> float:
    return Metrics(httpx.get(f"{url}/metrics").text)(
        "tokenmill_router_worker_healthy", worker=worker
    )


def eventually(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition did not hold in time"
        time.sleep(0.02)


def test_health_checks_take_a_worker_out_and_back() -> None:
    a, b = FakeWorker("a"), FakeWorker("b")
    with routed([a, b], policy="round_robin") as (url, threads):
        a.healthy = False
        eventually(lambda: worker_healthy(url, threads[0].url) == 0)
        for i in range(4):
            r = httpx.post(f"{url}/v1/completions", json={"prompt": f"q{i}", "max_tokens": 1})
            assert r.json()["worker"] == "b"
        a.healthy = True
        eventually(lambda: worker_healthy(url, threads[0].url) == 1)
        seen = {
            httpx.post(f"{url}/v1/completions", json={"prompt": f"r{i}", "max_tokens": 1}).json()[
                "worker"
            ]
            for i in range(4)
        }
        assert seen == {"a", "b"}
        assert httpx.get(f"{url}/v1/models").json()["data"][0]["id"] == "fake"
        assert httpx.get(f"{url}/no-such-page").status_code == 404  # the worker's answer
        assert httpx.get(f"{url}/health").json()["healthy_workers"] == 2


def test_a_client_gone_before_the_first_byte_aborts_on_the_worker() -> None:
    worker = FakeWorker("w", delay_s=2.0)
    with routed([worker]) as (url, _):
        with suppress(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/completions", json={"prompt": "p", "max_tokens": 1}, timeout=0.3)
        deadline = time.monotonic() + 5
        while worker.aborted == 0:
            assert time.monotonic() < deadline, "the worker never saw the client go"
            time.sleep(0.02)
        m = Metrics(httpx.get(f"{url}/metrics").text)
        assert m("tokenmill_router_worker_outstanding_requests") == 0
        assert m("tokenmill_router_worker_predicted_work_tokens") == 0
        assert m("tokenmill_router_requests_total", outcome="client_gone") == 1
        assert worker.completed == 0


def test_router_command_line() -> None:
    """`tokenmill router` in a subprocess over a fake worker; it imports no torch."""
    worker = FakeWorker("w")
    port = free_port()
    with AppThread(worker.app) as w:
        cmd = [sys.executable, "-m", "tokenmill", "router", "--worker", w.url,
               "--port", str(port), "--policy", "least_load"]  # fmt: skip
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:

            def up() -> bool:
                assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
                try:
                    return httpx.get(f"{url}/health").status_code == 200
                except httpx.TransportError:
                    return False

            eventually(up, timeout=60)
            r = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 2})
            assert r.status_code == 200 and r.json()["worker"] == "w"
            m = Metrics(httpx.get(f"{url}/metrics").text)
            assert m("tokenmill_router_routing_decisions_total", reason="least_load") == 1
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=30)
    assert proc.returncode == 0
    bad = subprocess.run(
        [sys.executable, "-m", "tokenmill", "router", "--worker", "localhost:1"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "http://" in bad.stderr


def test_a_client_gone_mid_stream_closes_the_workers_stream() -> None:
    worker = FakeWorker("w", token_delay_s=0.1)
    with routed([worker]) as (url, _), httpx.Client(base_url=url, timeout=30) as client:
        body = {"prompt": "p", "max_tokens": 100, "stream": True}
        with client.stream("POST", "/v1/completions", json=body) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    break  # one event, then hang up
        eventually(lambda: worker.aborted == 1, timeout=5)
        assert worker.completed == 0
        eventually(lambda: Metrics(httpx.get(f"{url}/metrics").text)(
            "tokenmill_router_worker_outstanding_requests") == 0)  # fmt: skip


def test_a_stream_dropped_after_its_headers_but_before_its_first_byte_is_retried() -> None:
    stalling = FakeWorker("stalling", token_delay_s=60.0)  # headers now, first event never
    fine = FakeWorker("fine")
    with routed([stalling, fine], policy="round_robin") as (url, threads):

        def kill_once_busy() -> None:
            eventually(lambda: stalling.requests >= 2, timeout=30)
            threads[0].kill()

        killer = threading.Thread(target=kill_once_busy)
        killer.start()

        async def main() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                body = {"prompt": "p", "max_tokens": 2, "stream": True}
                return await asyncio.gather(
                    *(client.post("/v1/completions", json=body) for _ in range(4))
                )

        results = asyncio.run(main())
        killer.join()
        assert [r.status_code for r in results] == [200] * 4
        assert all('"worker": "fine"' in r.text for r in results)
        m = Metrics(httpx.get(f"{url}/metrics").text)
        assert m("tokenmill_router_requests_total", worker=threads[0].url, outcome="dropped") >= 1
