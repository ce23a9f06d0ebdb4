"""The slo scheduling policy: least slack first, hopeless requests last, TTFT rescue by
preemption, admission control, short prompt chunks beside decodes -- on an injected clock; FCFS
and priority schedules unchanged."""

from __future__ import annotations

import zlib

import pytest
from fcfs_workload import fcfs_digest
from hypothesis import given, settings
from hypothesis import strategies as st
from sched_utils import Clock, FakeRunner, make_sched, make_slo_sched, reference

from tokenmill.core.sched_types import ModelRunnerOutput
from tokenmill.core.scheduler import Scheduler
from tokenmill.core.slo_knobs import SloKnobs
from tokenmill.core.step_model import StepCostModel, StepShape
from tokenmill.core.urgency import SETTLED_STEPS
from tokenmill.request import Request, RequestStatus
from tokenmill.sampling_params import SamplingParams
from tokenmill.sim.simulator import SimConfig, simulate
from tokenmill.sim.trace import TraceRecord

# The schedules of this workload before the slo policy existed (sha256 of every step).
FCFS_DIGEST = "055f7504b2ec05d50208e5f7184311f47c52efdb88965b6f663dc73e5d6f6675"
PRIORITY_DIGEST = "09a11d23826e4dc57bebf9e99b989a162486b34091547260b1300c77406d7494"


@pytest.mark.parametrize("with_slo", [False, True])
def test_fcfs_and_priority_schedules_unchanged(with_slo: bool) -> None:
    assert fcfs_digest("fcfs", with_slo) == FCFS_DIGEST
    assert fcfs_digest("priority", with_slo) == PRIORITY_DIGEST


def req(rid: str, n_prompt: int, max_tokens: int, arrival: float = 0.0, **slo: float) -> Request:
    params = SamplingParams(max_tokens=max_tokens, slo=slo or None)
    # zlib.crc32, not hash(): str hashes change per process, and equal prompts share a cache
    prompt = [(zlib.crc32(rid.encode()) + i) % 40 + 1 for i in range(n_prompt)]
    return Request(rid, prompt, params, max_tokens=max_tokens, arrival_time=arrival)


def drive(sched, clock: Clock, dt: float = 0.01, max_steps: int = 2000) -> list[str]:
    """Runs to the end on the fake model; returns request ids in order of finishing."""
    runner = FakeRunner(sched.config.block_size)
    done: list[str] = []
    for _ in range(max_steps):
        if not sched.has_unfinished_requests():
            return done
        out = sched.schedule()
        clock.now += dt
        for o in sched.update_from_output(out, runner.execute(out)):
            if o.finished:
                done.append(o.req.request_id)
    raise AssertionError("starved")


def test_least_slack_first_regardless_of_arrival() -> None:
    clock = Clock()
    sched = make_slo_sched(clock, max_num_seqs=1)
    sched.add_request(req("loose", 8, 5, deadline_ms=10_000.0))
    sched.add_request(req("none", 8, 5))  # no target: after every request with one
    sched.add_request(req("tight", 8, 5, arrival=0.001, deadline_ms=500.0))
    assert drive(sched, clock) == ["tight", "loose", "none"]


def test_hopeless_request_goes_last_and_is_flagged() -> None:
    clock = Clock()
    sched = make_slo_sched(clock, max_num_seqs=1)
    doomed = req("doomed", 8, 20, deadline_ms=50.0)  # 20 steps of 10 ms: cannot make 50 ms
    sched.add_request(doomed)
    sched.add_request(req("fine", 8, 5, deadline_ms=5_000.0))
    assert "cannot be met" in (sched.unattainable("doomed") or "")
    assert sched.unattainable("fine") is None
    assert drive(sched, clock) == ["fine", "doomed"]
    assert doomed.slo_hopeless and sched.slo.num_hopeless == 1


def settle(sched: Scheduler) -> None:
    """Feeds the step-cost model `SETTLED_STEPS` steps at its own predictions (it keeps them)."""
    cost = sched.step_cost
    for i in range(SETTLED_STEPS):
        shape = StepShape(1 + 37 * (i % 5), 1 + i % 3, 50 * (i % 7))
        cost.observe(shape, cost.predict(shape))


def run_steps(sched: Scheduler, clock: Clock, n: int, dt: float = 0.01) -> None:
    runner = FakeRunner(sched.config.block_size)
    for _ in range(n):
        out = sched.schedule()
        clock.now += dt
        sched.update_from_output(out, runner.execute(out))


def run_late_chat(sched: Scheduler, clock: Clock) -> Request:
    """A chat whose TTFT no one could meet, run for 3 tokens: its TPOT target left is easy."""
    late = req("late", 8, 20, arrival=clock.now, ttft_ms=1.0, tpot_ms=1_000.0)
    sched.add_request(late)
    run_steps(sched, clock, 3)
    assert late.num_output_tokens == 3 and late.slo_hopeless
    return late


def test_hopeless_requests_go_last_in_arrival_order_for_good() -> None:
    clock = Clock()
    sched = make_slo_sched(clock, max_num_seqs=1)
    settle(sched)
    coeffs = sched.step_cost.coeffs
    sched.add_request(req("h1", 8, 20, deadline_ms=50.0))  # 20 steps of 10 ms: too late
    sched.add_request(req("h2", 8, 40, arrival=0.001, deadline_ms=50.0))  # even more so
    sched.add_request(req("fine", 8, 5, arrival=0.002, deadline_ms=5_000.0))
    assert drive(sched, clock) == ["fine", "h1", "h2"]  # not h2 first, by latest start
    assert sched._key(run_late_chat(sched, clock))[0] == 2  # stays hopeless
    assert sched.step_cost.coeffs == pytest.approx(coeffs)
    # While the cost model may still be its prior, the verdict is taken afresh at each step.
    clock = Clock()
    sched = make_slo_sched(clock, max_num_seqs=1)
    assert sched._key(run_late_chat(sched, clock))[0] == 0


def test_ttft_rescue_preempts_a_decode_with_slack() -> None:
    clock = Clock()
    sched = make_slo_sched(clock, max_num_seqs=1)
    long = req("long", 8, 50)  # no target: slack to spare
    sched.add_request(long)
    run_steps(sched, clock, 3)
    assert long.status == RequestStatus.RUNNING and long.num_output_tokens == 3
    sched.add_request(req("chat", 8, 2, arrival=clock.now, ttft_ms=30.0))
    out = sched.schedule()
    assert out.preempted_req_ids == ["long"]
    assert [s.req.request_id for s in out.seqs] == ["chat"]


def test_no_rescue_from_a_request_without_spare_slack() -> None:
    clock = Clock()
    sched = make_slo_sched(clock, max_num_seqs=1)
    busy = req("busy", 8, 10, deadline_ms=130.0)  # ~110 ms of work: no slack to give
    sched.add_request(busy)
    runner = FakeRunner(sched.config.block_size)
    out = sched.schedule()
    clock.now += 0.01
    sched.update_from_output(out, runner.execute(out))
    sched.add_request(req("chat", 8, 2, arrival=clock.now, ttft_ms=30.0))
    out = sched.schedule()
    assert not out.preempted_req_ids and [s.req.request_id for s in out.seqs] == ["busy"]


def test_slo_policy_changes_timing_not_tokens() -> None:
    """Every request's tokens equal the reference whatever the order and preemptions."""
    clock = Clock()
    sched = make_slo_sched(clock, num_blocks=24, max_num_seqs=4)
    reqs = [
        req(f"r{i}", 5 + 7 * i % 30, 3 + i % 9, arrival=i * 0.001, ttft_ms=20.0 + 13 * (i % 5))
        if i % 3
        else req(f"r{i}", 5 + 7 * i % 30, 3 + i % 9, arrival=i * 0.001, deadline_ms=300.0 + i)
        for i in range(24)
    ]
    runner = FakeRunner(sched.config.block_size)
    outputs: dict[str, list[int]] = {r.request_id: [] for r in reqs}
    pending = list(reqs)
    for _ in range(3000):
        if pending:
            sched.add_request(pending.pop(0))
        if not pending and not sched.has_unfinished_requests():
            break
        out = sched.schedule()
        clock.now += 0.01
        for o in sched.update_from_output(out, runner.execute(out)):
            outputs[o.req.request_id].extend(o.new_token_ids)
    assert sched.num_preemptions > 0  # the rescue and the small cache really preempted
    for r in reqs:
        assert outputs[r.request_id] == reference(r, sched.max_model_len), r.request_id


def test_step_model_recovers_its_coefficients() -> None:
    truth = StepCostModel((0.02, 0.001, 0.003, 0.004))
    model = StepCostModel((0.05, 0.0, 0.0, 0.0), fit_every=8)
    shapes = [StepShape(t, s, c) for t in (1, 8, 64, 300) for s in (1, 4, 8) for c in (0, 900)]
    for shape in shapes * 4:
        if shape.seqs <= shape.tokens:
            model.observe(shape, truth.predict(shape))
    model.refit()
    for shape in shapes:
        assert model.predict(shape) == pytest.approx(truth.predict(shape), rel=0.1)


# -- properties, on the simulator: one seat, everything arrives at 0, fixed step costs --------


def _trace(jobs: list[tuple[int, int]]) -> list[TraceRecord]:
    return [
        TraceRecord(f"j{i}", prompt_tokens=8, output_tokens=out, slo={"deadline_ms": dl})
        for i, (out, dl) in enumerate(jobs)
    ]


def _one_seat(records: list[TraceRecord]):
    cfg = SimConfig(policy="slo", max_num_seqs=1, coeffs=(0.01, 0.0, 0.0, 0.0))
    return simulate(records, cfg).outcomes


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(50, 2000), min_size=2, max_size=7))
def test_equal_work_no_miss_behind_a_later_deadline(deadlines: list[int]) -> None:
    """Same work each: a request with slack to meet its deadline never misses while a request
    with a later deadline was served before it."""
    outcomes = _one_seat(_trace([(5, float(d)) for d in deadlines]))
    for a in outcomes.values():
        missed = a.finish > a.rec.slo["deadline_ms"] / 1000.0
        if not missed or a.hopeless:
            continue
        for b in outcomes.values():
            if b.finish <= a.first_token:  # b was served first
                assert b.rec.slo["deadline_ms"] <= a.rec.slo["deadline_ms"], (a.rec, b.rec)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 30), st.integers(50, 2000)), min_size=2, max_size=7))
def test_no_miss_behind_a_request_with_more_slack(jobs: list[tuple[int, int]]) -> None:
    """Mixed work: a request that misses (and was not hopeless) was never passed over by one
    whose latest start time (deadline minus work) was later than its own."""
    outcomes = _one_seat(_trace([(o, float(d)) for o, d in jobs]))

    def lst(o) -> float:  # noqa: ANN001
        return o.rec.slo["deadline_ms"] / 1000.0 - o.rec.output_tokens * 0.01

    for a in outcomes.values():
        if a.finish <= a.rec.slo["deadline_ms"] / 1000.0 or a.hopeless:
            continue
        for b in outcomes.values():
            if b.finish <= a.first_token:
                assert lst(b) <= lst(a) + 1e-9, (a.rec, b.rec)


def test_model_output_is_a_fixed_token_per_step() -> None:
    """The simulator's stand-in model: sampled seqs get one token, others none."""
    sched = make_sched()
    sched.add_request(Request("x", [1, 2, 3], SamplingParams(max_tokens=2), max_tokens=2))
    out = sched.schedule()
    sched.update_from_output(out, ModelRunnerOutput({"x": [7]}))
    assert sched.get_request("x").output_token_ids == [7]


@pytest.mark.parametrize(
    ("decoding", "deadline_ms", "expected"),
    [(True, 10_000.0, 16), (True, 150.0, 60), (False, 10_000.0, 60)],
)
def test_prompt_chunks_are_capped_while_decodes_share_the_step(
    decoding: bool, deadline_ms: float, expected: int
) -> None:
    """A 60-token prompt with slack to spare runs 16 tokens a step beside a decode; one about
    to miss, or one with no decode beside it, runs whole."""
    clock = Clock()
    base = make_sched(policy="slo", slo_knobs=SloKnobs(chunk_tokens=16))
    sched = Scheduler(base.config, clock=clock, step_cost=StepCostModel((0.01, 0.001, 0.0, 0.0)))
    runner = FakeRunner(sched.config.block_size)
    if decoding:
        sched.add_request(req("dec", 8, 20, deadline_ms=10_000.0))
        out = sched.schedule()
        clock.now += 0.01
        sched.update_from_output(out, runner.execute(out))
    sched.add_request(req("prompt", 60, 2, arrival=clock.now, deadline_ms=deadline_ms))
    out = sched.schedule()
    sizes = {s.req.request_id: len(s.token_ids) for s in out.seqs}
    assert sizes["prompt"] == expected
    assert sizes.get("dec", 1) == 1


@pytest.mark.parametrize("siblings", [True, False])
def test_a_fan_out_stage_runs_together(siblings: bool) -> None:
    """Past the `min_batch` most urgent, requests with slack sit the step out -- but not the
    other candidates of a stage that runs (the next stage waits for the last of them)."""
    clock = Clock()
    knobs = SloKnobs(min_batch=1, siblings=siblings, shed_load=0.0)
    base = make_sched(policy="slo", slo_knobs=knobs)
    sched = Scheduler(base.config, clock=clock, step_cost=StepCostModel((0.01, 0.001, 0.0, 0.0)))
    runner = FakeRunner(sched.config.block_size)
    for i, rid in enumerate(["w.sql.0", "w.sql.1", "w.sql.2", "v.sql"]):
        wf = rid.split(".")[0]
        params = SamplingParams(
            max_tokens=20,
            slo={"deadline_ms": 60_000.0 if wf == "w" else 90_000.0},
            workflow={"id": wf, "stage": 1, "remaining_stages": 0},
        )
        sched.add_request(Request(rid, [1, 2, 3, 10 + i], params, max_tokens=20))
    out = sched.schedule()
    assert len(out.seqs) == 4  # the prompts: admitted together
    clock.now += 0.01
    sched.update_from_output(out, runner.execute(out))
    out = sched.schedule()
    ran = sorted(s.req.request_id for s in out.seqs)
    assert ran == (["w.sql.0", "w.sql.1", "w.sql.2"] if siblings else ["w.sql.0"])
