"""Server fixtures: one fp32 batch-invariant engine on the default model for the whole session;
each test module runs its own app over it (uvicorn in a background thread on a free port), one at
a time, and leaves the engine idle with every KV block free."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from server_utils import Server, running_server

from tokenmill.config import EngineConfig
from tokenmill.engine.engine import LLMEngine

_ENGINE: list[LLMEngine] = []


@pytest.fixture(scope="session")
def llm_engine() -> Iterator[LLMEngine]:
    if not _ENGINE:
        _ENGINE.append(
            LLMEngine(EngineConfig(dtype="float32", batch_invariant=True, kv_cache_memory_gb=0.5))
        )
    yield _ENGINE[0]


@pytest.fixture(scope="module")
def server(llm_engine: LLMEngine) -> Iterator[Server]:
    """The plain server: no key, a generous queue."""
    with running_server(llm_engine, max_pending_seqs=256) as s:
        yield s
