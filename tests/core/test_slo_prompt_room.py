"""The slo policy's decode room: while a running decode is short of slack, the prompt chunks of
requests with slack to spare shrink to a share of that slack."""

from __future__ import annotations

import pytest
from sched_utils import Clock, FakeRunner, make_budget_sched

from tokenmill.core.slo_knobs import SloKnobs
from tokenmill.core.slo_prompt_room import MIN_TOKENS
from tokenmill.request import Request
from tokenmill.sampling_params import SamplingParams


def _req(rid: str, n_prompt: int, max_tokens: int, deadline_s: float) -> Request:
    params = SamplingParams(max_tokens=max_tokens, slo={"deadline_ms": deadline_s * 1000.0})
    base = 1 if rid == "bulk" else 50  # no shared prefix
    prompt = [base + i % 40 for i in range(n_prompt)]
    return Request(rid, prompt, params, max_tokens=max_tokens, arrival_time=0.0)


def _bulk_chunk(slack_s: float, decode_room: float) -> int:
    """The bulk prompt's tokens in the step where a decode with `slack_s` of slack runs."""
    clock = Clock()
    knobs = SloKnobs(shed_load=0.0, decode_room=decode_room, hold_steps=0)
    sched = make_budget_sched(clock, knobs)
    runner = FakeRunner(sched.config.block_size)
    # 101 tokens to generate: after its prompt step, 100 steps of 11 ms (1.1 s) remain.
    sched.add_request(_req("dec", 32, 101, slack_s + 1.1 + 0.05))
    out = sched.schedule()
    clock.now += 0.05
    sched.update_from_output(out, runner.execute(out))
    sched.add_request(_req("bulk", 1500, 4, 600.0))
    out = sched.schedule()
    sizes = {s.req.request_id: len(s.token_ids) for s in out.seqs}
    assert sizes["dec"] == 1
    return sizes["bulk"]


@pytest.mark.parametrize(
    ("slack_s", "expected"),
    [
        (600.0, 128),  # slack to spare: the chunk cap as it is
        (10.0, 50),  # 0.1 s a step, half of it: 50 tokens of 1 ms
        (3.0, MIN_TOKENS),  # 30 ms a step, half of it is 15 tokens: the minimum still goes in
    ],
)
def test_the_chunk_shrinks_with_the_tightest_decodes_slack(slack_s: float, expected: int) -> None:
    assert _bulk_chunk(slack_s, decode_room=0.5) == expected


def test_off_keeps_the_chunk_cap() -> None:
    assert _bulk_chunk(3.0, decode_room=0.0) == 128
