"""The slo policy's hold (core/slo_hold.py): pure decode steps keep the last full decision
while every deferred request would still sit out, for at most `hold_steps` steps."""

from __future__ import annotations

from sched_utils import Clock, make_slo_sched
from test_slo_sched import req

from tokenmill.core.sched_types import ModelRunnerOutput, SchedulerOutput
from tokenmill.core.scheduler import Scheduler
from tokenmill.core.slo_knobs import SloKnobs

STEP = 0.013  # a decode step of three rows under make_slo_sched's costs


def _setup(hold_steps: int) -> tuple[Scheduler, Clock]:
    """Three requests that run and one with slack to spare that sits out (4th by urgency)."""
    clock = Clock()
    knobs = SloKnobs(hold_steps=hold_steps, shed_load=0.0)
    sched = make_slo_sched(clock, slo_knobs=knobs)
    for i in range(3):
        sched.add_request(req(f"lead{i}", 8, 200, deadline_ms=6_200.0))
    sched.add_request(req("loose", 8, 20, deadline_ms=4_000.0))
    return sched, clock


def _step(sched: Scheduler, clock: Clock) -> tuple[SchedulerOutput, bool]:
    """One step of STEP seconds; whether it was held."""
    held = sched._slo._hold.held
    out = sched.schedule()
    clock.now += STEP
    sched.update_from_output(out, ModelRunnerOutput({s.req.request_id: [7] for s in out.seqs}))
    return out, sched._slo._hold.held == held + 1


def _ids(out: SchedulerOutput) -> list[str]:
    return [s.req.request_id for s in out.seqs]


def test_a_held_step_decides_as_the_full_decision() -> None:
    held, clock_h = _setup(hold_steps=4)
    fresh, clock_f = _setup(hold_steps=0)
    pattern = []
    for _ in range(14):
        out_h, was_held = _step(held, clock_h)
        out_f, _ = _step(fresh, clock_f)
        pattern.append(was_held)
        assert _ids(out_h) == _ids(out_f)
        assert [r.request_id for r in held.running] == [r.request_id for r in fresh.running]
        assert held._slo.room.defer == fresh._slo.room.defer
    # Admission, then the first full decision over pure decodes; then 4 held steps at most.
    assert pattern == [False, False] + ([True] * 4 + [False]) * 2 + [True] * 2
    assert held._slo.room.defer == {"loose"}
    assert held.kv_cache_manager.num_held_blocks(held.requests["loose"])[0] > 0  # keeps its KV


def test_an_arrival_ends_the_hold() -> None:
    sched, clock = _setup(hold_steps=100)
    assert [_step(sched, clock)[1] for _ in range(4)] == [False, False, True, True]
    sched.add_request(req("late", 8, 4, arrival=clock.now, deadline_ms=60_000.0))
    assert not _step(sched, clock)[1]


def test_a_deferred_request_whose_slack_falls_to_its_threshold_ends_the_hold() -> None:
    sched, clock = _setup(hold_steps=10_000)
    for _ in range(3):
        out, _ = _step(sched, clock)
    loose = sched.requests["loose"]
    tracker = sched.slo
    # Slack to spare while slack > defer_ratio * remaining work; neither depends on the time.
    work = tracker.remaining_work(loose)[1]
    ratio = sched.config.slo_knobs.defer_ratio
    due = tracker.latest_start(loose, tracker.states["loose"]) - ratio * work
    clock.now = due - 0.002
    out, was_held = _step(sched, clock)
    assert was_held and "loose" not in _ids(out)
    clock.now = due + 0.002
    out, was_held = _step(sched, clock)
    assert not was_held and "loose" in _ids(out)
