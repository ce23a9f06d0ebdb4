"""Shared fixtures. Every engine a test builds is checked for block-pool integrity afterwards."""

from __future__ import annotations

import pytest

from tokenmill.engine.llm import LLM

_DEFAULT_LLMS: dict[tuple, LLM] = {}
# Fixtures that load the default model: a test using one belongs to the slow lane.
DEFAULT_MODEL_FIXTURES = frozenset({"default_llm_fp32", "llm_engine"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`pytest -m 'not slow'` must not load the default model: its fixtures need the mark."""
    unmarked = [
        item.nodeid
        for item in items
        if DEFAULT_MODEL_FIXTURES.intersection(getattr(item, "fixturenames", ()))
        and item.get_closest_marker("slow") is None
    ]
    if unmarked:
        raise pytest.UsageError(
            "tests on the default model must be marked slow: " + ", ".join(unmarked)
        )


def check_engine_clean(llm: LLM) -> None:
    """Block pool integrity: free + used == total, no leaks once every request is done."""
    sched = llm.engine.scheduler
    assert not sched.has_unfinished_requests()
    for group in sched.kv_cache_manager.groups:
        pool = group.pool
        pool.check_integrity()
        assert pool.num_used_blocks == 0, f"{pool.num_used_blocks} KV blocks leaked"
    assert not llm.engine.outputs.states, "output state leaked"


@pytest.fixture
def make_llm():
    """Builds LLMs; after the test each one must be idle with every KV block free."""
    built: list[LLM] = []

    def make(**kwargs) -> LLM:
        llm = LLM(**kwargs)
        built.append(llm)
        return llm

    yield make
    for llm in built:
        check_engine_clean(llm)


@pytest.fixture
def default_llm_fp32():
    """One fp32 engine on the default model, shared across tests (loading takes seconds)."""
    key = ("fp32",)
    if key not in _DEFAULT_LLMS:
        _DEFAULT_LLMS[key] = LLM(  # forced runs off: token-by-token masked decoding
            dtype="float32",
            quantization="none",
            batch_invariant=True,
            kv_cache_memory_gb=0.5,
            max_forced_tokens=0,
        )
    llm = _DEFAULT_LLMS[key]
    yield llm
    check_engine_clean(llm)
