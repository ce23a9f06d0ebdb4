"""The simulator and the synthetic trace: dependencies hold in simulated time, the trace is
reproducible and shaped as documented, traces round-trip through JSONL."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest

from tokenmill.core.slo_knobs import SloKnobs
from tokenmill.sim import simulator
from tokenmill.sim.fast_forward import run_decodes
from tokenmill.sim.report import summarize
from tokenmill.sim.simulator import SimConfig, simulate
from tokenmill.sim.text2sql import FANOUT, deadline_multiples, generate
from tokenmill.sim.trace import TraceRecord, check_trace, load_trace, prompt_ids, save_trace


def test_trace_is_reproducible_and_shaped() -> None:
    a, b = generate(0.5, 120, seed=7), generate(0.5, 120, seed=7)
    assert a == b and a != generate(0.5, 120, seed=8)
    check_trace(a)
    stages: dict[str, set[int]] = {}
    copies: dict[tuple[str, int], int] = {}
    for r in a:
        if r.workflow:
            wf, st = r.workflow["id"], r.workflow["stage"]
            stages.setdefault(wf, set()).add(st)
            copies[wf, st] = copies.get((wf, st), 0) + 1
            assert r.slo and "deadline_ms" in r.slo
        else:
            assert r.slo and "ttft_ms" in r.slo and not r.after
    assert stages and all(3 <= len(s) <= 5 for s in stages.values())
    assert set(copies.values()) == {1, FANOUT}


def test_deadline_multiples_recover_the_drawn_range() -> None:
    recs = generate(0.5, 240, seed=3, deadline_scale=(2.5, 4.0))
    multiples = deadline_multiples(recs)
    assert set(multiples) == {r.workflow["id"] for r in recs if r.workflow}
    # Deadlines are rounded to 0.1 ms: the multiples are the drawn ones to within that.
    assert all(2.5 - 1e-3 <= m <= 4.0 + 1e-3 for _, m in multiples.values())
    assert {n for n, _ in multiples.values()} == {3, 4, 5}


def test_prompt_ids_are_drawn_once_and_handed_out_as_fresh_lists() -> None:
    rec = TraceRecord(
        id="q7", arrival=0.0, prompt_tokens=40, output_tokens=3, prefix="s", prefix_tokens=24
    )
    # The definition: the prefix's ids from its name, the rest from the record's id.
    expected = random.Random("prefix:s").choices(range(100, 32000), k=24)
    expected += random.Random("req:q7").choices(range(100, 32000), k=16)
    first = prompt_ids(rec)
    assert first == expected
    first.append(5)  # a request's prompt list is its own
    assert prompt_ids(rec) == expected


def test_round_trip(tmp_path: Path) -> None:
    recs = generate(0.5, 60, seed=1)
    save_trace(recs, tmp_path / "t.jsonl")
    assert load_trace(tmp_path / "t.jsonl") == recs
    with pytest.raises(ValueError, match="unknown or later"):
        check_trace([TraceRecord("b", 4, 4, after=["a"]), TraceRecord("a", 4, 4)])


@pytest.mark.parametrize("policy", ["fcfs", "priority", "slo"])
def test_dependencies_hold_in_simulated_time(policy: str) -> None:
    recs = generate(0.6, 120, seed=2)
    result = simulate(recs, SimConfig(policy=policy))
    out = result.outcomes
    for r in recs:
        o = out.get(r.id)
        if o is None:
            continue  # its workflow ran out of time before it was released
        if o.finish is not None:
            assert o.release <= o.first_token <= o.finish
        for p in r.after:
            assert out[p].finish is not None and o.release >= out[p].finish + r.delay - 1e-9
    report = summarize(out.values(), result.makespan)
    assert 0.0 <= report.deadline_attainment <= 1.0 and report.goodput > 0


def _assert_fast_forward_changes_nothing(
    config: SimConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run with stretches of pure decodes applied in one go equals one without: every step's
    shape and time, every request's first token, finish, rejection and hopelessness."""
    recs = generate(1.2, 90, seed=5)
    full = simulate(recs, dataclasses.replace(config, fast_forward=False), log_steps=True)
    skipped: list[int] = []

    def counted(*args):  # noqa: ANN002, ANN202
        out = run_decodes(*args)
        skipped.append(out[1])
        return out

    monkeypatch.setattr(simulator, "run_decodes", counted)
    fast = simulate(recs, config, log_steps=True)
    assert sum(skipped) > 100  # it really fast-forwarded
    assert fast.num_steps == full.num_steps and fast.step_log == full.step_log
    busy = 0.0
    for _, dt in full.step_log:  # in order, as the simulator adds them (sum() compensates)
        busy += dt
    assert fast.busy == full.busy == busy and 0.0 < busy < full.makespan
    for rid, o in full.outcomes.items():
        f = fast.outcomes[rid]
        assert (f.first_token, f.finish, f.rejected, f.hopeless) == (
            o.first_token,
            o.finish,
            o.rejected,
            o.hopeless,
        )


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
@pytest.mark.parametrize("kw", [{}, {"num_kv_blocks": 300}, {"max_num_seqs": 4}])
def test_fast_forward_changes_nothing(
    policy: str, kw: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under fcfs and priority (a small KV cache preempts too)."""
    _assert_fast_forward_changes_nothing(SimConfig(policy=policy, **kw), monkeypatch)


@pytest.mark.parametrize(
    ("hold", "kw"),
    [(3, {}), (3, {"num_kv_blocks": 300}), (3, {"max_num_seqs": 4}), (10**9, {})],
)
def test_fast_forward_changes_nothing_under_the_slo_hold(
    hold: int, kw: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under slo, the steps that keep the last decision (SloKnobs.hold_steps), deferred
    requests sitting out."""
    config = SimConfig(policy="slo", slo_knobs=SloKnobs(hold_steps=hold), **kw)
    _assert_fast_forward_changes_nothing(config, monkeypatch)
