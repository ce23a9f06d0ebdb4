"""The slo policy's overload shedding: give up on the fewest requests so that the rest make it.

Least slack first is optimal while everyone can make it; in a burst it lets everyone be late
together (each request served just before its own deadline delays the next one past its own).
Each step, the requests with targets (running and waiting, not hopeless) are taken as jobs on
one machine: a due time (the target their slack is measured against) and the server time they
still need (prompt tokens at b seconds each, then each token a share of the current decode step).
A workflow is one job (`workflows`): due at its deadline, needing its running or queued stage's
work plus the predicted work of its later stages, so a workflow at its first stage is seen with
all the work still ahead of it, not just the first stage's. Moore-Hodgson's algorithm, in
due-time order, drops the largest job whenever the work accepted so far cannot be done by the
current one's due time; it leaves the most jobs on time. A dropped request (with every request
of its workflow, whose deadline it shares) is *doomed*: it is served after every request that can
still make it, as hopeless ones are, so its work no longer makes others late. Doom is sticky,
also for the workflow's later stages. `load` > 1 inflates the work (the batch does not pack
perfectly).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from tokenmill.core.urgency import INF, SloState, SloTracker
from tokenmill.request import Request


@dataclass
class _Job:
    due: float
    work: float = 0.0
    reqs: list[Request] = field(default_factory=list)


def doomed(
    tracker: SloTracker,
    reqs: Iterable[Request],
    key: Callable[[Request], tuple],
    load: float,
    workflows: bool = True,
) -> list[Request]:
    """The requests to give up on now (Moore-Hodgson over workflows and single requests)."""
    jobs: dict[str, _Job] = {}
    states = tracker.states
    for req in reqs:
        st = states.get(req.request_id)
        if st is None or key(req)[0]:
            continue  # no target, hopeless or doomed already: not competing
        due, work = job_of(tracker, req, st)
        if due == INF:
            continue
        wf = req.sampling_params.workflow
        whole = workflows and wf is not None and st.deadline < INF
        if whole:
            due = st.deadline
        gid = "w:" + wf.id if wf is not None else "r:" + req.request_id
        job = jobs.get(gid)
        if job is None:
            # The later stages' work, once per workflow (a fan-out's requests share them).
            job = jobs[gid] = _Job(due, st.rest_work * load if whole else 0.0, [req])
        else:
            if due < job.due:
                job.due = due
            job.reqs.append(req)
        job.work += work * load
    out: list[Request] = []
    if not jobs:
        return out
    now = tracker.now
    total = 0.0
    first = INF
    for job in jobs.values():  # the sum and the min below, in one pass
        total += job.work
        if job.due < first:
            first = job.due
    if now + total <= first:
        return out  # all of it fits before the first due time: no one is late
    accepted: list[tuple[float, int, _Job]] = []  # max-heap of (-work, tie-break, job)
    total = 0.0
    for i, job in enumerate(sorted(jobs.values(), key=lambda j: j.due)):
        heapq.heappush(accepted, (-job.work, i, job))
        total += job.work
        if now + total > job.due:
            neg, _, victim = heapq.heappop(accepted)
            total += neg
            out.extend(victim.reqs)
    return out


def job_of(tracker: SloTracker, req: Request, st: SloState) -> tuple[float, float]:
    """(due time, server seconds needed by then) of the request's binding target: the one its
    latest start time comes from. Server seconds are marginal: prompt tokens cost b, each
    decode step a 1/batch share of the current decode step."""
    n_out = len(req.output_token_ids)
    n_tok = len(req.prompt_token_ids) + n_out
    pending = n_tok - max(req.num_computed_tokens, st.cached)
    a, b, c, d = tracker.cost.coeffs
    per_token = tracker.step_time / tracker.batch
    if pending > 1:
        first = pending * b + -(-pending // tracker.budget) * (c + d * n_tok / 1000.0)
    else:
        first = per_token
    end = first + max(0, req.max_tokens - n_out - 1) * per_token
    best = (INF, 0.0)
    if st.first_token is None and st.ttft_deadline < INF:
        best = (st.ttft_deadline, first)
    if st.stage_deadline < INF and st.stage_deadline - end < best[0] - best[1]:
        best = (st.stage_deadline, end)
    if st.tpot_s is not None and st.first_token is not None:
        due = st.first_token + st.tpot_s * max(0, req.max_tokens - 1)
        if due - end < best[0] - best[1]:
            best = (due, end)
    return best
