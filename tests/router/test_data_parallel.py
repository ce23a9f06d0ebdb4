"""`tokenmill serve --data-parallel-size 2` end to end on a tiny model: two replica processes
behind the router; completions, chat and streaming; a replica killed (SIGKILL) while requests
wait on it loses none of them, and comes back."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from utils_tiny import make_tiny_hf_folder

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "server"))
from router_utils import free_port  # noqa: E402
from server_utils import Metrics  # noqa: E402


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def wait_for(url: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, "the front end exited"
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"not up in {timeout} s"
        time.sleep(0.25)


def healthy_workers(url: str) -> float:
    return Metrics(httpx.get(f"{url}/metrics").text)("tokenmill_router_worker_healthy")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc for the replicas")
def test_data_parallel_serve(tmp_path: Path) -> None:
    folder = make_tiny_hf_folder(tmp_path)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    cmd = [sys.executable, "-m", "tokenmill", "serve", str(folder), "--port", str(port),
           "--data-parallel-size", "2", "--num-threads", "2", "--dtype", "float32",
           "--kv-cache-memory-gb", "0.05", "--uvicorn-log-level", "warning"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env)
    try:
        wait_for(url, proc, 300)
        assert healthy_workers(url) == 2
        replicas = children(proc.pid)
        assert len(replicas) == 2
        model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        r = httpx.post(
            f"{url}/v1/completions",
            json={"model": model, "prompt": "Hello", "max_tokens": 3},
            timeout=60,
        )
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3, r.text
        chat = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json={**chat, "stream": True},
                          timeout=60) as s:  # fmt: skip
            lines = [x for x in s.iter_lines() if x]
        assert s.status_code == 200 and lines[-1] == "data: [DONE]"
        page = httpx.get(f"{url}/")  # the chat page, from a replica
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        bad = httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": ""})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "prompt"

        # Kill one replica while requests are in flight on both: none is lost.
        results: list[httpx.Response] = []

        async def burst() -> None:
            async with httpx.AsyncClient(base_url=url, timeout=120) as client:
                body = {"model": model, "max_tokens": 200, "ignore_eos": True}
                results.extend(
                    await asyncio.gather(
                        *(client.post("/v1/completions", json={**body, "prompt": f"Count {i}:"})
                          for i in range(8))
                    )
                )  # fmt: skip

        killer = threading.Timer(0.3, os.kill, (replicas[0], signal.SIGKILL))
        killer.start()
        asyncio.run(burst())
        killer.join()
        assert [r.status_code for r in results] == [200] * 8, [r.text for r in results]
        assert all(r.json()["usage"]["completion_tokens"] == 200 for r in results)
        m = Metrics(httpx.get(f"{url}/metrics").text)
        assert m("tokenmill_router_requests_total", outcome="2xx") >= 10
        assert m("tokenmill_router_retries_total") >= 1  # the kill caught requests in flight
        # the front end starts the dead replica again and the health checks bring it back
        deadline = time.monotonic() + 180
        while healthy_workers(url) < 2:
            assert time.monotonic() < deadline, "the killed replica did not come back"
            time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    time.sleep(0.5)
    for pid in replicas:  # no replica outlives the front end
        assert (
            not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
        )
