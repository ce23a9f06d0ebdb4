"""The slo policy's overload shedding: give up on the fewest requests so that the rest make it.

Least slack first is optimal while everyone can make it; in a burst it lets everyone be late
together (each request served just before its own deadline delays the next one past its own).
Each step, the requests with targets (running and waiting, not hopeless) are taken as jobs on
one machine: a due time (the target their slack is measured against) and the server time they
still need (prompt tokens at b seconds each, then each token a share of the current decode step).
Moore-Hodgson's algorithm, in due-time order, drops the largest job whenever the work accepted
so far cannot be done by the current one's due time; it leaves the most jobs on time. A dropped
request (with every request of its workflow, whose deadline it shares) is *doomed*: it is served
after every request that can still make it, as hopeless ones are, so its work no longer makes
others late. Doom is sticky, also for the workflow's later stages. `load` > 1 inflates the work
(the batch does not pack perfectly).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable

from tokenmill.core.urgency import INF, SloTracker
from tokenmill.request import Request


def doomed(
    tracker: SloTracker,
    reqs: Iterable[Request],
    key: Callable[[Request], tuple],
    load: float,
    whole: bool = False,
) -> list[Request]:
    """The requests to give up on now (Moore-Hodgson over workflows and single requests)."""
    groups: dict[str, list[Request]] = {}
    jobs: dict[str, list[float]] = {}  # group -> [due, work]
    for req in reqs:
        st = tracker.states.get(req.request_id)
        if st is None or key(req)[0]:
            continue  # no target, hopeless or doomed already: not competing
        due, work = tracker.job(req, st)
        if due == INF:
            continue
        wf = req.sampling_params.workflow
        rest = 0.0
        if wf is not None and whole and st.deadline < INF:
            # The whole workflow is one job: its deadline, and the work of its later stages.
            due, rest = st.deadline, st.rest_work * tracker.step_time_share()
        gid = "w:" + wf.id if wf is not None else "r:" + req.request_id
        groups.setdefault(gid, []).append(req)
        job = jobs.get(gid)
        if job is None:
            jobs[gid] = [due, (work + rest) * load]
        else:
            job[0] = min(job[0], due)
            job[1] += work * load
    out: list[Request] = []
    now = tracker.now
    if not jobs or now + sum(w for _, w in jobs.values()) <= min(d for d, _ in jobs.values()):
        return out  # all of it fits before the first due time: no one is late
    accepted: list[tuple[float, str]] = []  # max-heap of (-work, group)
    total = 0.0
    for gid, (due, work) in sorted(jobs.items(), key=lambda kv: kv[1][0]):
        heapq.heappush(accepted, (-work, gid))
        total += work
        if now + total > due:
            neg, victim = heapq.heappop(accepted)
            total += neg
            out.extend(groups[victim])
    return out
