"""The router over two real servers (tiny random model, in-process engines): on 4 long shared
system prompts x 32 questions, the replicas' own prefix-cache hit rate under cache-aware routing
is within 10% of one replica's and above round-robin's."""

from __future__ import annotations

import random
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tokenmill.config import EngineConfig
from tokenmill.engine.engine import LLMEngine
from tokenmill.router.app import create_router_app
from tokenmill.router.config import RouterConfig
from utils_tiny import make_tiny_hf_folder

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "server"))
from router_utils import AppThread, run_workload  # noqa: E402
from server_utils import Metrics, running_server  # noqa: E402


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[LLMEngine]]:
    folder = make_tiny_hf_folder(tmp_path_factory.mktemp("router"), max_position_embeddings=1024)
    cfg = EngineConfig(model=str(folder), dtype="float32", kv_cache_memory_gb=0.05, num_threads=1)
    yield [LLMEngine(cfg), LLMEngine(cfg)]


def workload(salt: str) -> list[dict[str, object]]:
    # ~250 tokens per system prompt; the salt keeps each run's prompts out of earlier caches
    systems = [f"[{salt}] You are assistant {i}. " + f"Rule {i}: answer precisely. " * 40
               for i in range(4)]  # fmt: skip
    bodies = [
        {"messages": [{"role": "system", "content": s},
                      {"role": "user", "content": f"Question {q}: what is {q} squared?"}],
         "max_tokens": 1}
        for q in range(32) for s in systems
    ]  # fmt: skip
    random.Random(0).shuffle(bodies)  # interleaved, round-robin would follow the prompts
    return bodies


def prefix_counts(urls: list[str]) -> tuple[float, float]:
    ms = [Metrics(httpx.get(f"{u}/metrics").text) for u in urls]
    return (
        sum(m("tokenmill_prefix_cache_hits_total") for m in ms),
        sum(m("tokenmill_prefix_cache_queries_total") for m in ms),
    )


def measured_hit_rate(urls: list[str], policy: str, salt: str) -> float:
    hits0, queries0 = prefix_counts(urls)
    config = RouterConfig(worker=urls, policy=policy, health_interval_s=1.0)
    with AppThread(create_router_app(config)) as router:
        run_workload(router.url, workload(salt), concurrency=8)
    hits1, queries1 = prefix_counts(urls)
    return (hits1 - hits0) / (queries1 - queries0)


@pytest.mark.slow  # the tiny model's folder takes ~5 s to write on a quiet host, 20 s on a busy one
def test_cache_aware_keeps_one_replicas_hit_rate(engines: list[LLMEngine]) -> None:
    with running_server(engines[0]) as s0, running_server(engines[1]) as s1:
        one = measured_hit_rate([s0.url], "cache_aware", "one")
        cache_aware = measured_hit_rate([s0.url, s1.url], "cache_aware", "ca")
        round_robin = measured_hit_rate([s0.url, s1.url], "round_robin", "rr")
    rates = {"one": one, "cache_aware": cache_aware, "round_robin": round_robin}
    assert cache_aware >= 0.9 * one, rates
    assert cache_aware > round_robin, rates
