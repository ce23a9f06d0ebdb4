"""Many requests at once: identical outputs to running alone (batch-invariant fp32 engine), and
client disconnects (streaming or not) abort the request and free its KV blocks at once."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import openai
import pytest
from server_utils import Server

pytestmark = pytest.mark.slow  # a server over the default model

NUM = 16
MAX = 8
WORDS = "river mountain city library engine storm garden winter market forest bridge harbor"


def prompts() -> list[str]:
    words = WORDS.split()
    return [
        f"Story {i}: the {words[i % len(words)]} and the {words[(3 * i) % 12]}" for i in range(NUM)
    ]


def request(i: int, prompt: str) -> dict:
    # Half greedy, half seeded sampling: both must not depend on the batch.
    if i % 2:
        return dict(prompt=prompt, max_tokens=MAX, temperature=0.9, seed=100 + i, ignore_eos=True)
    return dict(prompt=prompt, max_tokens=MAX, temperature=0, ignore_eos=True)


async def stream_one(client: openai.AsyncOpenAI, model: str, body: dict) -> tuple[str, int]:
    extra = {"ignore_eos": body.pop("ignore_eos")}
    s = await client.completions.create(
        model=model, stream=True, stream_options={"include_usage": True}, extra_body=extra, **body
    )
    text, usage = "", 0
    async for chunk in s:
        if chunk.choices:
            text += chunk.choices[0].text
        if chunk.usage:
            usage = chunk.usage.completion_tokens
    return text, usage


def test_concurrent_streams_match_running_alone(server: Server) -> None:
    bodies = [request(i, p) for i, p in enumerate(prompts())]

    async def main() -> tuple[list, list]:
        client = openai.AsyncOpenAI(base_url=server.base_url, api_key="x", max_retries=0)
        async with client:
            alone = [await stream_one(client, server.model, dict(b)) for b in bodies]
            together = await asyncio.gather(
                *(stream_one(client, server.model, dict(b)) for b in bodies)
            )
        return alone, list(together)

    alone, together = asyncio.run(main())
    assert all(n == MAX for _, n in alone)
    assert together == alone
    server.wait_idle()


def _raw_stream_request(server: Server, body: dict) -> socket.socket:
    """Sends a streaming completion over a raw socket (so the test controls the disconnect)."""
    payload = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=60)
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    ).encode()
    sock.sendall(head + payload)
    return sock


def test_disconnect_mid_stream_aborts_and_frees_kv(server: Server) -> None:
    before = server.wait_idle()
    aborted_before = before("tokenmill_request_success_total", finished_reason="abort")
    body = {
        "model": server.model,
        "prompt": "Tell me a long story about a dragon.",
        "max_tokens": 2000,
        "ignore_eos": True,
        "stream": True,
    }
    sock = _raw_stream_request(server, body)
    received = b""
    while received.count(b"data: ") < 3:  # a few tokens arrived: the request is running
        chunk = sock.recv(65536)
        assert chunk, "server closed the stream early"
        received += chunk
    assert b"200 OK" in received.split(b"\r\n")[0]
    m = server.metrics()
    assert m("tokenmill_num_requests_running") == 1
    assert m("tokenmill_kv_cache_used_blocks") > 0
    sock.close()
    t0 = time.monotonic()
    after = server.wait_idle(timeout=30)
    assert time.monotonic() - t0 < 30
    assert after("tokenmill_request_success_total", finished_reason="abort") == aborted_before + 1
    assert (
        after("tokenmill_generation_tokens_total")
        < before("tokenmill_generation_tokens_total") + 2000
    )
    # the server still serves
    r = httpx.post(
        f"{server.base_url}/completions",
        json={"prompt": "Hi", "max_tokens": 2, "model": server.model},
        timeout=60,
    )
    assert r.status_code == 200


def test_disconnect_while_waiting_for_non_streaming_response(server: Server) -> None:
    before = server.wait_idle()
    aborted_before = before("tokenmill_request_success_total", finished_reason="abort")
    body = {"model": server.model, "prompt": "Once", "max_tokens": 2000, "ignore_eos": True}
    sock = _raw_stream_request(server, body)
    deadline = time.monotonic() + 60
    while (
        server.metrics()("tokenmill_generation_tokens_total")
        < before("tokenmill_generation_tokens_total") + 3
    ):
        assert time.monotonic() < deadline, "the request never started generating"
        time.sleep(0.05)
    sock.close()
    after = server.wait_idle(timeout=30)
    assert after("tokenmill_request_success_total", finished_reason="abort") == aborted_before + 1
