"""The slo policy's decode room: prompt chunks shrink while a running decode is short of slack.

While decodes share a step, a prompt with slack to spare runs at most `SloKnobs.chunk_tokens`
tokens a step. Each of its tokens lengthens the step by the step-cost model's b seconds, and so
delays every decode row in the step by as much. A decode with a target that has s seconds of
slack and k steps still to run can give up about s / k seconds a step; the chunk is cut to
`decode_room` times the smallest such share over the decodes that run, in tokens (b seconds
each), so that the prompts eat a bounded part of the tightest decode's slack instead of all of
it. The chunk never falls under `MIN_TOKENS`: a prompt with slack to spare still advances.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

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
