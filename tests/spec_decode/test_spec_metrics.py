"""Speculative decoding counters reach /metrics through EngineStats."""

from __future__ import annotations

from types import SimpleNamespace

from tokenmill.engine.async_engine import EngineStats
from tokenmill.server.metrics import ServerMetrics


def test_spec_metrics_exported() -> None:
    stats = EngineStats(
        spec_drafted_tokens=40, spec_accepted_tokens=30, spec_decode_steps=20, spec_decode_tokens=50
    )
    engine = SimpleNamespace(stats=stats, num_pending_seqs=0, is_healthy=True)
    metrics = ServerMetrics("m")
    metrics.attach(engine)  # type: ignore[arg-type]
    text = metrics.render().decode()
    values = {
        line.split("{")[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("tokenmill_spec_decode")
    }
    assert values == {
        "tokenmill_spec_decode_num_draft_tokens_total": 40.0,
        "tokenmill_spec_decode_num_accepted_tokens_total": 30.0,
        "tokenmill_spec_decode_num_steps_total": 20.0,
        "tokenmill_spec_decode_acceptance_rate": 0.75,
        "tokenmill_spec_decode_mean_tokens_per_step": 2.5,
    }
