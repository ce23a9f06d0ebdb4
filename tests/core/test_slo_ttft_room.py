"""The slo policy keeps a step short enough for a first token about to miss its TTFT: prompt
chunks of requests with slack to spare take only what the TTFT leaves."""

from __future__ import annotations

import pytest
from sched_utils import SLO_COEFFS, Clock, FakeRunner, make_budget_sched

from tokenmill.core.slo_knobs import SloKnobs
from tokenmill.core.step_model import StepCostModel, StepShape
from tokenmill.request import Request
from tokenmill.sampling_params import SamplingParams


def _req(rid: str, n_prompt: int, max_tokens: int, arrival: float, **slo: float) -> Request:
    params = SamplingParams(max_tokens=max_tokens, slo=slo)
    base = 1 if rid == "bulk" else 50  # no shared prefix
    prompt = [base + i % 40 for i in range(n_prompt)]
    return Request(rid, prompt, params, max_tokens=max_tokens, arrival_time=arrival)


@pytest.mark.parametrize("ttft_room", [True, False])
def test_a_prompt_with_slack_leaves_the_step_to_a_ttft_about_to_miss(ttft_room: bool) -> None:
    clock = Clock()
    knobs = SloKnobs(ttft_room=ttft_room, shed_load=0.0)
    sched = make_budget_sched(clock, knobs)
    runner = FakeRunner(sched.config.block_size)
    sched.add_request(_req("bulk", 1500, 4, 0.0, deadline_ms=60_000.0))
    out = sched.schedule()  # the bulk prompt's first chunk: it is running, mid-prompt
    assert [len(s.token_ids) for s in out.seqs] == [512]
    clock.now += 0.5
    sched.update_from_output(out, runner.execute(out))
    sched.add_request(_req("chat", 100, 8, clock.now, ttft_ms=200.0))
    out = sched.schedule()
    sizes = {s.req.request_id: len(s.token_ids) for s in out.seqs}
    assert sizes["chat"] == 100  # its whole prompt: the first token comes out of this step
    step = StepCostModel(SLO_COEFFS).predict(StepShape.of(out))
    if ttft_room:
        assert sizes.get("bulk", 0) > 0 and step <= 0.2  # in time for the chat's TTFT
    else:
        assert sizes["bulk"] == 412 and step > 0.2  # the rest of the budget: the chat misses


def test_no_spare_room_skips_the_prompt_with_slack() -> None:
    """A TTFT so tight that the urgent prompt fills the step: the other prompt sits it out."""
    clock = Clock()
    sched = make_budget_sched(clock, SloKnobs(shed_load=0.0))
    runner = FakeRunner(sched.config.block_size)
    sched.add_request(_req("bulk", 1500, 4, 0.0, deadline_ms=60_000.0))
    out = sched.schedule()
    clock.now += 0.5
    sched.update_from_output(out, runner.execute(out))
    sched.add_request(_req("chat", 100, 8, clock.now, ttft_ms=118.0))
    out = sched.schedule()
    assert [(s.req.request_id, len(s.token_ids)) for s in out.seqs] == [("chat", 100)]
    clock.now += 0.11
    sched.update_from_output(out, runner.execute(out))
    out = sched.schedule()  # the first token is out: the bulk prompt goes on
    assert {s.req.request_id for s in out.seqs} == {"bulk", "chat"}
