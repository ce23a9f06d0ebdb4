"""The slo policy inside the scheduler: each step's keys, order, deferrals and TTFT rescue.

`SloStep` holds what the policy keeps between steps (the tracker of targets and slack, the keys
of the current step, the shape of the last measured step) and makes the policy's first moves
in a step: fresh keys at this step's time, the running list in their order, deferral of running
requests with slack to spare, and room for requests about to miss their TTFT -- or, in a
stretch of pure decode steps, keeps its last such decision for a few steps (core/slo_hold.py).

A waiting request whose slack is under `urgent_steps` decode steps and that has a TTFT target
still to meet gets a seat and KV blocks now, if need be by preempting the least urgent running
requests -- but only a victim whose own slack covers recomputing what it loses plus the margin
(a decode with slack to spare; a request without targets always has). Such requests also get
budget before the prompt chunks of less urgent running requests: `reserve` tokens are held back
from those, and the prompt chunks of requests with slack to spare add only as many tokens to
the step as the tightest such TTFT leaves (`ttft_spare`). Hopeless requests never preempt anyone.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tokenmill.core.sched_config import SchedulerConfig
from tokenmill.core.slo_admission import SloAdmission
from tokenmill.core.slo_hold import Hold
from tokenmill.core.slo_prompt_room import decode_room_chunk, ttft_spare
from tokenmill.core.slo_shed import doomed
from tokenmill.core.step_model import StepCostModel, StepShape
from tokenmill.core.urgency import INF, SloTracker

if TYPE_CHECKING:
    from tokenmill.core.scheduler import Scheduler
    from tokenmill.request import Request


@dataclass
class UrgentRoom:
    preempted: list[str] = field(default_factory=list)
    reserve: int = 0  # budget held back from less urgent prompt chunks
    key: tuple | None = None  # the least urgent request the reserve is for
    defer: set[str] = field(default_factory=set)  # running requests that sit this step out
    chunk: int = 0  # prompt tokens a step gives a request with slack to spare (0: no cap)
    # Prompt tokens that requests with slack to spare may still add to this step, all together,
    # so that the first token of a request about to miss its TTFT comes in time (None: any).
    spare: int | None = None


class SloStep:
    """The slo policy's state and per-step decisions; `key` is the scheduler's sort key."""

    def __init__(
        self,
        config: SchedulerConfig,
        clock: Callable[[], float],
        step_cost: StepCostModel,
        arrival_seq: dict[str, int],
    ) -> None:
        self.knobs = config.slo_knobs
        self.tracker = SloTracker(step_cost, config.max_num_batched_tokens, clock, self.knobs)
        self._arrival_seq = arrival_seq
        self._keys: dict[str, tuple] = {}  # this step's keys: slack is taken once per step
        self.last_shape: StepShape | None = None  # of the last step measured
        self.room = UrgentRoom()  # the current step's
        self._hold = Hold(self.knobs.hold_steps, self.knobs.min_batch)
        # `lead_stages` of the last full decision, taken by the first held step that needs it
        self._stages: set[tuple[str, int]] | None = None

    def key(self, req: Request) -> tuple:
        key = self._keys.get(req.request_id)
        if key is None:
            key = self.tracker.key(req, self._arrival_seq[req.request_id])
            self._keys[req.request_id] = key
        return key

    def begin(self, sched: Scheduler) -> UrgentRoom:
        """Fresh keys at this step's time, the running list in their order, then room for
        requests about to miss their TTFT and the running requests that sit the step out --
        or the last such decision again while the hold rule applies (`hold`)."""
        held = self.hold(sched)
        if held is not None:
            return held
        self._keys.clear()
        self.tracker.begin_step(sched.running, self.last_shape)
        if self.knobs.shed_load > 0 and self.tracker.states:
            for req in doomed(
                self.tracker,
                [*sched.running, *sched.waiting],
                self.key,
                self.knobs.shed_load,
                self.knobs.shed_workflows,
            ):
                self.tracker.doom(req)
                self._keys.pop(req.request_id, None)
        sched.running.sort(key=self.key)
        room = make_room(sched)
        room.defer = deferred(sched)
        if self.knobs.chunk_tokens and any(
            r.request_id not in room.defer for r in sched.decoding_requests()
        ):
            room.chunk = decode_room_chunk(
                sched, room.defer, self.knobs.chunk_tokens, self.knobs.decode_room
            )
        if self.knobs.ttft_room:
            room.spare = ttft_spare(sched, room.defer)
        self.room = room
        self._hold.decided(sched, self.key)
        self._stages = None
        return room

    def may_hold(self, sched: Scheduler) -> bool:
        """Whether the last full decision may still be held (`hold` checks the rest)."""
        return self._hold.may_hold(sched)

    def hold(self, sched: Scheduler, decoding: bool = False) -> UrgentRoom | None:
        """This step's room if it keeps the last full decision (None: decide afresh; see
        core/slo_hold.py). What a failed check changed, the full decision redoes. `decoding`:
        the caller knows that the requests outside the deferred ones decode one token each
        (the simulator, in the held steps after the first of a stretch)."""
        hold, defer = self._hold, self.room.defer
        if not hold.may_hold(sched) or not (decoding or hold.decodes(sched, defer)):
            return None
        self._keys.clear()
        self.tracker.begin_step(sched.running, self.last_shape)
        if defer:
            stages = self._stages
            if stages is None:  # the running list is as the full decision left it
                stages = self._stages = lead_stages(sched)
            tracker = self.tracker

            def still(req: Request, key: tuple) -> bool:
                return sits_out(tracker, req, key, stages)

            if not hold.still_deferred(sched, defer, self.key, still):
                return None
        hold.held += 1
        self.room = UrgentRoom(defer=defer, chunk=self.room.chunk)
        return self.room

    def chunk_cap(self, req: Request, num_new: int) -> int:
        """`num_new` prompt tokens for `req` this step, when `req` has slack to spare capped
        while decodes share the step (a full-budget chunk would stall every decode in it for
        the time of tens of decode steps) and, while a first token is about to miss its TTFT,
        to what that TTFT leaves of the step (`room.spare`, used up as prompts take it)."""
        room = self.room
        cap = room.chunk
        if (not cap or num_new <= cap) and room.spare is None:
            return num_new
        if self.key(req)[1] - self.tracker.now <= self.tracker.urgent_slack:
            return num_new  # about to miss: its prompt goes in at full speed
        if cap:
            num_new = min(num_new, cap)
        if room.spare is not None:
            num_new = min(num_new, room.spare)
            room.spare -= num_new
        return num_new

    def admission_guard(self, running: list[Request]) -> SloAdmission:
        return SloAdmission(self.tracker, running, self.key, self.tracker.urgent_slack)

    def unattainable(self, req: Request, running: list[Request]) -> str | None:
        """Why a queued request cannot meet its SLO even if served first (None if it can)."""
        st = self.tracker.states.get(req.request_id)
        if st is None:
            return None
        self.tracker.begin_step([*running, req])
        return self.tracker.miss_reason(req, st)

    def observe(self, shape: StepShape, seconds: float) -> None:
        self.last_shape = shape
        self.tracker.cost.observe(shape, seconds)


def deferred(sched: Scheduler) -> set[str]:
    """The running requests (sorted by urgency) with slack to spare beyond the first
    `min_batch` and their workflow stages' other requests."""
    tracker = sched.slo
    knobs = tracker.knobs
    out: set[str] = set()
    if knobs.shed_load > 0 and any(
        sched._key(r)[0] == 0 and sched._key(r)[1] < INF for r in sched.running
    ):
        # Doomed requests only use capacity that no request that can make it needs.
        out.update(r.request_id for r in sched.running if sched._key(r)[0] == 1)
    stages = lead_stages(sched)
    for req in sched.running[knobs.min_batch :]:
        if sits_out(tracker, req, sched._key(req), stages):
            out.add(req.request_id)
    return out


def lead_stages(sched: Scheduler) -> set[tuple[str, int]]:
    """The workflow stages among the `min_batch` most urgent running requests (sorted)."""
    knobs = sched.slo.knobs
    stages: set[tuple[str, int]] = set()
    if knobs.siblings:
        for req in sched.running[: knobs.min_batch]:
            wf = req.sampling_params.workflow
            if wf is not None:
                stages.add((wf.id, wf.stage))
    return stages


def sits_out(tracker: SloTracker, req: Request, key: tuple, stages: set[tuple[str, int]]) -> bool:
    """Whether a running request past the `min_batch` most urgent sits the step out, by its
    `key` at `tracker.now`; `stages`: those of the most urgent (`lead_stages`). The one
    deferral condition of the full decision (`deferred`) and of a held step (`SloStep.hold`)."""
    if key[0] or key[1] == INF:
        return True  # hopeless or without targets: only spare capacity
    wf = req.sampling_params.workflow
    if stages and wf is not None and (wf.id, wf.stage) in stages:
        return False  # a sibling of one that runs: the stage ends with its last request
    work = tracker.remaining_work(req)[1]
    return key[1] - tracker.now > tracker.knobs.defer_ratio * work


def make_room(sched: Scheduler) -> UrgentRoom:
    tracker = sched.slo
    room = UrgentRoom()
    if not tracker.states:
        return room
    kv = sched.kv_cache_manager
    budget = sched.config.max_num_batched_tokens
    margin = tracker.urgent_slack
    max_urgent = tracker.knobs.max_urgent
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
        if num_urgent >= max_urgent:
            break
    return room


def _recompute(sched: Scheduler, req: Request) -> float:
    """Seconds to recompute what a preemption would drop (its computed tokens)."""
    n = req.num_computed_tokens
    budget = sched.config.max_num_batched_tokens
    tracker = sched.slo
    return math.ceil(n / budget) * tracker.step_time + n * tracker.cost.coeffs[1]
