"""`tokenmill make-trace` and `tokenmill simulate`: a trace written by one replays in the other,
with the same figures as the library call, and a bad trace is one clear error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tokenmill.cli import main
from tokenmill.sim.report import summarize
from tokenmill.sim.simulator import SimConfig, simulate
from tokenmill.sim.trace import load_trace


def test_make_trace_then_simulate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = tmp_path / "t.jsonl"
    assert main(["make-trace", str(trace), "--rate", "0.3", "--duration", "60", "--seed", "3"]) == 0
    assert "records" in capsys.readouterr().out
    assert main(["simulate", str(trace), "--policy", "fcfs", "--policy", "slo", "--json"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["policy"] for x in lines] == ["fcfs", "slo"]
    records = load_trace(trace)
    for got in lines:
        res = simulate(records, SimConfig(policy=got["policy"]))
        want = summarize(res.outcomes.values(), res.makespan)
        # Stages whose workflow's deadline passed before their release are never sent.
        assert got["num_requests"] == want.num_requests <= len(records)
        assert got["deadline_attainment"] == want.deadline_attainment
        assert got["goodput"] == want.goodput
        assert got["num_steps"] == res.num_steps and got["busy_s"] == res.busy
        assert 0.0 < got["busy_s"] <= got["makespan"]
    # The text report: steps, how busy the simulated engine was, and the attainment lines.
    assert main(["simulate", str(trace), "--policy", "slo"]) == 0
    out = capsys.readouterr().out
    assert "== slo:" in out and "of the makespan" in out and "deadline attainment" in out


def test_simulate_bad_trace_is_one_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = tmp_path / "bad.jsonl"
    trace.write_text('{"id": "a", "prompt_tokens": 8, "output_tokens": 0}\n')
    assert main(["simulate", str(trace)]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:1" in err and "output_tokens" in err
