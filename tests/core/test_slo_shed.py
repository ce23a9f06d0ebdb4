"""The slo policy's estimates and overload shedding: the one-pass key agrees with the slow path,
the deadline split, prefix-cache hits in the predicted work, Moore-Hodgson's choice of whom to
give up on, sticky doom per workflow, and more deadlines met in a burst than without shedding."""

from __future__ import annotations

import random
import zlib

import pytest
from sched_utils import SLO_COEFFS, Clock, FakeRunner, make_slo_sched

from tokenmill.core.slo_knobs import SloKnobs
from tokenmill.core.slo_shed import doomed
from tokenmill.core.step_model import StepCostModel
from tokenmill.core.urgency import SloTracker
from tokenmill.request import Request
from tokenmill.sampling_params import SamplingParams
from tokenmill.sim.report import summarize
from tokenmill.sim.simulator import SimConfig, simulate
from tokenmill.sim.trace import TraceRecord


def req(rid: str, n_prompt: int, max_tokens: int, wf: dict | None = None, **slo: float) -> Request:
    params = SamplingParams(max_tokens=max_tokens, slo=slo or None, workflow=wf)
    # zlib.crc32, not hash(): str hashes change per process, and equal prompts share a cache
    prompt = [(zlib.crc32(rid.encode()) + i) % 40 + 1 for i in range(n_prompt)]
    return Request(rid, prompt, params, max_tokens=max_tokens, arrival_time=0.0)


def test_one_pass_key_agrees_with_latest_start_and_miss_reason() -> None:
    rng = random.Random(0)
    clock = Clock()
    t = SloTracker(StepCostModel(), 512, clock)
    for i in range(300):
        slo = {k: rng.uniform(10, 20_000) for k in ("ttft_ms", "tpot_ms") if rng.random() < 0.5}
        slo["deadline_ms"] = rng.uniform(10, 20_000)
        wf = {"id": "w", "stage": rng.randint(0, 3), "remaining_stages": rng.randint(0, 3)}
        n = rng.randint(1, 100)
        r = req(f"r{i}", rng.randint(1, 1500), n, wf if rng.random() < 0.5 else None, **slo)
        r.arrival_time = clock.now
        st = t.add(r)
        r.output_token_ids = [7] * rng.randint(0, n - 1)
        r.num_computed_tokens = rng.randint(0, r.num_tokens)
        if r.output_token_ids and rng.random() < 0.7:
            st.first_token = clock.now + rng.uniform(-1, 1)
        clock.now += rng.uniform(0, 0.5)
        t.begin_step([r] * rng.randint(1, 20))
        key = t.key(r, 0)
        assert bool(key[0]) == (t.miss_reason(r, st) is not None)
        assert key[1] == pytest.approx(t.latest_start(r, st), abs=1e-9)


@pytest.mark.parametrize("split", ["latest", "proportional"])
def test_stage_deadline_split(split: str) -> None:
    t = SloTracker(StepCostModel(SLO_COEFFS), 512, Clock(), SloKnobs(deadline_split=split))
    wf = {"id": "w", "stage": 0, "remaining_stages": 2}
    st = t.add(req("s0", 8, 10, wf, deadline_ms=10_000.0))
    assert st.rest_work > 0 and st.rest_alone <= st.rest_work
    if split == "latest":  # HEXGEN: the workflow's deadline less the later stages' work
        assert st.stage_deadline == pytest.approx(10.0 - st.rest_work)
    else:  # its share by work: a third of the deadline for three equal stages
        assert st.stage_deadline == pytest.approx(10.0 / 3)


def test_prefix_cache_hit_is_not_predicted_work() -> None:
    clock = Clock()
    sched = make_slo_sched(clock)
    runner = FakeRunner(sched.config.block_size)
    first = req("a", 40, 1, deadline_ms=5_000.0)
    sched.add_request(first)
    while sched.has_unfinished_requests():
        out = sched.schedule()
        sched.update_from_output(out, runner.execute(out))
    again = req("b", 40, 1, deadline_ms=5_000.0)
    again.prompt_token_ids = list(first.prompt_token_ids)
    sched.add_request(again)
    fresh = req("c", 40, 1, deadline_ms=5_000.0)
    sched.add_request(fresh)
    assert sched.slo.states["b"].cached == 36 and sched.slo.states["c"].cached == 0
    assert sched.slo.pending(again) == 4 and sched.slo.pending(fresh) == 40


def test_moore_hodgson_gives_up_on_the_largest_job() -> None:
    """Three jobs due at 1 s (0.3 s of work each) and a 0.9 s one due at 1.2 s: together they
    cannot all make it, and dropping the big one saves the three others."""
    clock = Clock()
    t = SloTracker(StepCostModel(SLO_COEFFS), 512, clock)
    reqs = [req(f"s{i}", 1, 27, deadline_ms=1_000.0) for i in range(3)]  # 11 ms a step
    reqs.append(req("big", 1, 81, deadline_ms=1_200.0))
    for r in reqs:
        t.add(r)
    t.begin_step([])
    out = doomed(t, reqs, lambda r: t.key(r, 0), 1.0)
    assert [r.request_id for r in out] == ["big"]
    assert doomed(t, reqs[:3], lambda r: t.key(r, 0), 1.0) == []


def test_doom_is_sticky_for_the_workflow() -> None:
    t = SloTracker(StepCostModel(SLO_COEFFS), 512, Clock())
    wf = {"id": "w1", "stage": 0, "remaining_stages": 1}
    first = req("s0", 8, 4, wf, deadline_ms=1_000.0)
    t.add(first)
    t.doom(first)
    t.begin_step([])
    assert t.key(first, 0)[0] == 1 and t.num_doomed == 1
    later = req("s1", 8, 4, {"id": "w1", "stage": 1, "remaining_stages": 0}, deadline_ms=900.0)
    other = req("o", 8, 4, {"id": "w2", "stage": 1, "remaining_stages": 0}, deadline_ms=900.0)
    t.add(later)
    t.add(other)
    assert t.key(later, 1)[0] == 1 and t.key(other, 2)[0] == 0


def test_shedding_meets_more_deadlines_in_a_burst() -> None:
    """A burst on one seat that least slack first alone serves in a domino of misses."""
    rng = random.Random(3)
    recs = [
        TraceRecord(
            f"j{i}",
            prompt_tokens=8,
            output_tokens=rng.randint(5, 40),
            arrival=rng.uniform(0, 0.5),
            slo={"deadline_ms": rng.uniform(300, 2_500)},
        )
        for i in range(30)
    ]
    recs.sort(key=lambda r: r.arrival)

    def attainment(shed: float) -> float:
        cfg = SimConfig(
            policy="slo", max_num_seqs=1, coeffs=SLO_COEFFS, slo_knobs=SloKnobs(shed_load=shed)
        )
        res = simulate(recs, cfg)
        return summarize(res.outcomes.values(), res.makespan).deadline_attainment

    assert attainment(1.0) > attainment(0.0)


@pytest.mark.parametrize("workflows", [True, False])
def test_shedding_sees_a_workflow_with_its_later_stages(workflows: bool) -> None:
    """Two requests due at 1 s (0.3 s of work each) and a workflow's first stage (0.3 s) with
    two stages like it still to come, due at 1.3 s. Stage by stage everything fits (the stage is
    due at 1.3 s less 0.6 s), but the workflow cannot finish after the two others: taken as one
    job it is given up on, and the two requests are both on time."""
    t = SloTracker(StepCostModel(SLO_COEFFS), 512, Clock())
    reqs = [req(f"s{i}", 1, 27, deadline_ms=1_000.0) for i in range(2)]
    wf = {"id": "w", "stage": 0, "remaining_stages": 2}
    reqs.append(req("w.link", 1, 27, wf, deadline_ms=1_300.0))
    for r in reqs:
        t.add(r)
    assert t.states["w.link"].rest_work == pytest.approx(0.594)
    t.begin_step([])
    out = doomed(t, reqs, lambda r: t.key(r, 0), 1.0, workflows=workflows)
    assert [r.request_id for r in out] == (["w.link"] if workflows else [])


def test_a_fan_out_counts_its_later_stages_once() -> None:
    """Four parallel candidates of one stage: their own work adds up, the later stages' once."""
    t = SloTracker(StepCostModel(SLO_COEFFS), 512, Clock())
    wf = {"id": "w", "stage": 1, "remaining_stages": 1}
    cands = [req(f"w.sql.{i}", 1, 27, wf, deadline_ms=1_500.0) for i in range(4)]
    for r in cands:
        t.add(r)
    t.begin_step([])
    # 4 x 0.297 s of candidates and 0.297 s to come: 1.49 s fits 1.5 s (2% more would not)
    assert doomed(t, cands, lambda r: t.key(r, 0), 1.0) == []
    assert len(doomed(t, cands, lambda r: t.key(r, 0), 1.02)) == 4
