"""The slo policy's prompt room: how many prompt tokens of requests with slack to spare a step
may take, so that the step stays short enough for the requests that are short of time.

TTFT room (`ttft_spare`): while a first token is about to miss its TTFT, the step may last at
most what that TTFT leaves; the prompts with slack to spare get the tokens that time allows.

Decode room (`decode_room_chunk`): while decodes share a step, a prompt with slack to spare runs
at most `SloKnobs.chunk_tokens` tokens a step. Each of its tokens lengthens the step by the
step-cost model's b seconds, and so delays every decode row in the step by as much. A decode
with a target that has s seconds of slack and k steps still to run can give up about s / k
seconds a step; the chunk is cut to `decode_room` times the smallest such share over the decodes
that run, in tokens (b seconds each), so that the prompts eat a bounded part of the tightest
decode's slack instead of all of it. The chunk never falls under `MIN_TOKENS`: a prompt with
slack to spare still advances.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tokenmill.core.step_model import StepShape
from tokenmill.core.urgency import INF

if TYPE_CHECKING:
    from tokenmill.core.scheduler import Scheduler

MIN_TOKENS = 16  # one KV block: below it a step's fixed cost dwarfs what the prompt gains


def decode_room_chunk(sched: Scheduler, defer: set[str], cap: int, frac: float) -> int:
    """The prompt tokens a step gives a request with slack to spare: `cap`, or less while a
    decode that runs this step (not in `defer`) has little slack per step left."""
    tracker = sched.slo
    b = tracker.cost.coeffs[1]
    if frac <= 0 or b <= 0:
        return cap
    share = INF  # the least slack per remaining step over the decodes that run
    for req in sched.decoding_requests():
        if req.request_id in defer:
            continue
        key = sched._key(req)
        if key[0] == 0 and key[1] < INF:
            steps = max(1, tracker.remaining_steps(req))
            share = min(share, (key[1] - tracker.now) / steps)
    if share == INF:
        return cap
    tokens = frac * share / b
    return cap if tokens >= cap else max(MIN_TOKENS, int(tokens))


def ttft_spare(sched: Scheduler, defer: set[str]) -> int | None:
    """Prompt tokens that requests with slack to spare may add to this step so that the first
    tokens of the requests about to miss their TTFT (running or waiting) still come in time:
    the step is at most the tightest TTFT's time left (None: no such request, or its prompt
    needs more than this step anyway)."""
    tracker = sched.slo
    now = tracker.now
    margin = tracker.urgent_slack
    due = INF
    tokens = rows = context = 0
    # A queued request counts only while it may get a seat (else the step would idle for it).
    seats = len(sched.running) < sched.config.max_num_seqs
    for req in [*sched.running, *(sched.waiting if seats else ())]:
        key = sched._key(req)
        if req.request_id in defer or key[0]:
            continue
        pending = req.num_tokens - req.num_computed_tokens
        if pending <= 1:
            rows += 1  # a decode row in the step
            context += req.num_computed_tokens
            continue
        st = tracker.states.get(req.request_id)
        if st is None or st.first_token is not None or st.ttft_deadline == INF:
            continue
        if key[1] - now > margin:
            continue
        due = min(due, st.ttft_deadline)
        tokens += tracker.pending(req)
        context += req.num_tokens
    if due == INF or tokens > tracker.budget:
        return None
    b = tracker.cost.coeffs[1]
    # One decode step of margin: the model's error, and the spare chunk's own context.
    left = due - now - tracker.step_time
    left -= tracker.cost.predict(StepShape(tokens + rows, rows + 2, context))
    return max(0, int(left / b)) if b > 0 else None
