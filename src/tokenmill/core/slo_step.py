"""The slo policy's first move in a step: make room for requests about to miss their TTFT.

A waiting request whose slack is under `URGENT_STEPS` decode steps and that has a TTFT target
still to meet gets a seat and KV blocks now, if need be by preempting the least urgent running
requests -- but only a victim whose own slack covers recomputing what it loses plus the margin
(a decode with slack to spare; a request without targets always has). Such requests also get
budget before the prompt chunks of less urgent running requests: `reserve` tokens are held back
from those. Hopeless requests never preempt anyone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tokenmill.core.urgency import INF

if TYPE_CHECKING:
    from tokenmill.core.scheduler import Scheduler
    from tokenmill.request import Request

URGENT_STEPS = 4  # slack under this many decode steps: about to miss
MAX_URGENT = 4  # at most this many urgent requests handled per step (bounds the work)
# Deferral: past the MIN_BATCH most urgent running requests, one whose slack exceeds
# DEFER_RATIO times its remaining work sits this step out (it keeps its KV). On a CPU every
# sequence in a step slows the step, so the urgent ones finish sooner; MIN_BATCH keeps the
# step's fixed cost shared.
MIN_BATCH = 4
DEFER_RATIO = 1.0


@dataclass
class UrgentRoom:
    preempted: list[str] = field(default_factory=list)
    reserve: int = 0  # budget held back from less urgent prompt chunks
    key: tuple | None = None  # the least urgent request the reserve is for
    defer: set[str] = field(default_factory=set)  # running requests that sit this step out


def deferred(sched: Scheduler) -> set[str]:
    """The running requests (sorted by urgency) with slack to spare beyond the first MIN_BATCH."""
    tracker = sched.slo
    out: set[str] = set()
    for req in sched.running[MIN_BATCH:]:
        key = sched._key(req)
        if key[0] or key[1] == INF:
            out.add(req.request_id)  # hopeless or without targets: only spare capacity
            continue
        work = tracker.remaining_work(req)[1]
        if key[1] - tracker.now > DEFER_RATIO * work:
            out.add(req.request_id)
    return out


def make_room(sched: Scheduler) -> UrgentRoom:
    tracker = sched.slo
    room = UrgentRoom()
    if not tracker.states:
        return room
    kv = sched.kv_cache_manager
    budget = sched.config.max_num_batched_tokens
    margin = URGENT_STEPS * tracker.step_time
    num_urgent = 0
    for req in sched.waiting:
        st = tracker.states.get(req.request_id)
        key = sched._key(req)
        if key[0] or key[1] - tracker.now > margin:
            break  # sorted: hopeless ones and those with slack to spare come after
        if st is None or st.first_token is not None or st.ttft_deadline == INF:
            continue
        if req.grammar is not None and not req.grammar.ready:
            continue
        num_urgent += 1
        computed_ids, num_cached = kv.get_computed_blocks(req)
        need = req.num_tokens - num_cached

        def fits(req: Request = req, need: int = need, ids=computed_ids, hit=num_cached) -> bool:  # noqa: ANN001
            return len(sched.running) < sched.config.max_num_seqs and kv.can_allocate(
                req, need, ids, hit
            )

        while not fits() and sched.running:
            victim = sched.running[-1]
            if sched._key(victim) <= key or tracker.slack(victim) < margin + _recompute(
                sched, victim
            ):
                break
            sched._preempt(victim)
            room.preempted.append(victim.request_id)
        if fits():
            room.reserve = min(budget, room.reserve + need)
            room.key = key
        if num_urgent >= MAX_URGENT:
            break
    return room


def _recompute(sched: Scheduler, req: Request) -> float:
    """Seconds to recompute what a preemption would drop (its computed tokens)."""
    n = req.num_computed_tokens
    budget = sched.config.max_num_batched_tokens
    tracker = sched.slo
    return math.ceil(n / budget) * tracker.step_time + n * tracker.cost.coeffs[1]
