"""Soak: a couple hundred streamed requests over real HTTP, many at once, some clients hanging
up mid-stream (n > 1 ones included). Afterwards nothing is left behind (no KV block, running or
waiting request, pending sequence; by the engine and by /metrics) and greedy output is unchanged.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from server_utils import Server, check_engine_idle, running_server

from tokenmill.engine.engine import LLMEngine

pytestmark = pytest.mark.slow

NUM_REQUESTS = 200
CONCURRENCY = 16
PROBE = {"prompt": "The capital of France is", "max_tokens": 12, "temperature": 0,
         "ignore_eos": True, "logprobs": 0}  # fmt: skip


@pytest.fixture(scope="module")
def soak_server(llm_engine: LLMEngine) -> Iterator[Server]:
    with running_server(llm_engine, max_pending_seqs=256) as s:
        yield s


@dataclass
class Plan:
    chat: bool
    n: int
    max_tokens: int
    hang_up: bool  # after the first content chunk
    temperature: float


def plans(seed: int = 0) -> list[Plan]:
    rng = random.Random(seed)
    out = []
    for i in range(NUM_REQUESTS):
        n = rng.choice([1, 1, 1, 2, 3])
        # every tenth client hangs up, and a third of the n > 1 ones besides
        hang_up = i % 10 == 5 or (n > 1 and rng.random() < 0.33)
        out.append(Plan(rng.random() < 0.5, n, rng.randint(4, 12), hang_up, rng.choice([0, 0.8])))
    return out


def probe(server: Server) -> list[str]:
    r = httpx.post(f"{server.base_url}/completions", json={"model": server.model, **PROBE},
                   timeout=60)  # fmt: skip
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["logprobs"]["tokens"]


async def run_one(client: httpx.AsyncClient, server: Server, i: int, plan: Plan) -> str:
    body: dict = {"model": server.model, "n": plan.n, "max_tokens": plan.max_tokens,
                  "temperature": plan.temperature, "seed": i, "stream": True}  # fmt: skip
    if plan.chat:
        path = "/v1/chat/completions"
        body["messages"] = [{"role": "user", "content": f"Tell me about the number {i}."}]
    else:
        path = "/v1/completions"
        body["prompt"] = f"Request {i}: once upon a time"
    finished: set[int] = set()
    async with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                assert finished == set(range(plan.n)), (i, finished)
                return "done"
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            for choice in chunk["choices"]:
                if choice["finish_reason"] is not None:
                    finished.add(choice["index"])
            if plan.hang_up and chunk["choices"]:
                return "hung up"  # leaving the block closes the connection mid-stream
    raise AssertionError(f"request {i}: the stream ended without [DONE]")


async def soak(server: Server) -> list[str]:
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as client:
        gate = asyncio.Semaphore(CONCURRENCY)

        async def bounded(i: int, plan: Plan) -> str:
            async with gate:
                return await run_one(client, server, i, plan)

        return await asyncio.gather(*(bounded(i, p) for i, p in enumerate(plans())))


def test_soak_leaves_nothing_behind(soak_server: Server) -> None:
    engine = soak_server.engine
    before = probe(soak_server)
    preemptions = engine.scheduler.num_preemptions
    results = asyncio.run(soak(soak_server))
    assert results.count("hung up") >= NUM_REQUESTS // 10
    assert results.count("done") >= NUM_REQUESTS // 2
    m = soak_server.wait_idle(timeout=60)  # KV blocks, running, waiting, pending: all 0
    assert m("tokenmill_request_success_total", finished_reason="abort") > 0
    assert soak_server.async_engine.num_pending_seqs == 0
    check_engine_idle(engine)  # and by the engine itself: no request, no block, no state
    assert engine.scheduler.kv_cache_manager.num_free_blocks == engine.num_blocks
    assert probe(soak_server) == before
    assert httpx.get(f"{soak_server.url}/health").status_code == 200
    print(f"soak: {results.count('done')} done, {results.count('hung up')} hung up, "
          f"{engine.scheduler.num_preemptions - preemptions} preemptions")  # fmt: skip
