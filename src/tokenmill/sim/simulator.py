"""Replays a trace through the real Scheduler and KV cache manager on simulated time.

The model is replaced by the step-cost model: a step of a given shape takes the time the model
predicts, and every sampled token is a fixed non-stop token (each request generates exactly its
`output_tokens`). Dependent records are released when all their parents have finished, plus
their `delay`. The scheduler's own step-cost model learns from the simulated step times, as it
learns from measured ones in the engine.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

from tokenmill.core.kv_group import KVGroupSpec
from tokenmill.core.sched_types import ModelRunnerOutput
from tokenmill.core.scheduler import Scheduler, SchedulerConfig
from tokenmill.core.slo_knobs import SloKnobs
from tokenmill.core.step_model import DEFAULT_COEFFS, StepCostModel, StepShape
from tokenmill.request import Request, RequestStatus
from tokenmill.sampling_params import SamplingParams
from tokenmill.sim.fast_forward import decode_stretch, run_decodes
from tokenmill.sim.trace import TraceRecord, prompt_ids

_TOKEN = 7  # what every simulated step "samples"


@dataclass
class SimConfig:
    policy: str = "fcfs"
    max_num_batched_tokens: int = 512
    max_num_seqs: int = 128
    block_size: int = 16
    num_kv_blocks: int = 4096
    max_model_len: int = 8192
    enable_prefix_caching: bool = True
    reject_hopeless: bool = False
    coeffs: tuple[float, float, float, float] = DEFAULT_COEFFS  # the "model": step times
    slo_knobs: SloKnobs = field(default_factory=SloKnobs)
    # Apply stretches of pure decode steps in one go where the schedule is decided in advance
    # (fcfs, priority; slo while it holds its last decision: see sim/fast_forward.py); the same
    # results, faster.
    fast_forward: bool = True


@dataclass
class Outcome:
    """What happened to one record, in simulated seconds."""

    rec: TraceRecord
    release: float
    workflow_start: float
    first_token: float | None = None
    finish: float | None = None
    rejected: bool = False
    hopeless: bool = False


@dataclass
class SimResult:
    outcomes: dict[str, Outcome]
    makespan: float
    num_steps: int
    busy: float  # simulated seconds spent in steps (makespan less the time nothing could run)
    step_log: list[tuple[StepShape, float]] = field(default_factory=list)


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def simulate(records: list[TraceRecord], config: SimConfig, log_steps: bool = False) -> SimResult:
    clock = _Clock()
    sched = Scheduler(
        SchedulerConfig(
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_num_seqs=config.max_num_seqs,
            max_model_len=config.max_model_len,
            block_size=config.block_size,
            kv_groups=(KVGroupSpec(config.num_kv_blocks),),
            enable_prefix_caching=config.enable_prefix_caching,
            policy=config.policy,
            slo_knobs=config.slo_knobs,
        ),
        clock=clock,
        step_cost=StepCostModel(),
    )
    truth = StepCostModel(config.coeffs)
    children: dict[str, list[TraceRecord]] = {}
    num_parents: dict[str, int] = {}
    events: list[tuple[float, int, TraceRecord, float]] = []  # (release, seq, rec, wf start)
    seq = 0
    for rec in records:
        num_parents[rec.id] = len(rec.after)
        for p in rec.after:
            children.setdefault(p, []).append(rec)
        if not rec.after:
            events.append((rec.arrival, seq, rec, rec.arrival))
            seq += 1
    heapq.heapify(events)
    outcomes: dict[str, Outcome] = {}
    live: dict[str, Outcome] = {}
    num_steps = 0
    busy = 0.0
    log: list[tuple[StepShape, float]] = []

    def release(rec: TraceRecord, at: float, start: float) -> None:
        nonlocal seq
        heapq.heappush(events, (at, seq, rec, start))
        seq += 1

    def finish(o: Outcome) -> None:
        for child in children.get(o.rec.id, ()):
            num_parents[child.id] -= 1
            if num_parents[child.id] == 0 and not o.rejected:
                release(child, clock.now + child.delay, o.workflow_start)

    while events or sched.has_unfinished_requests():
        while events and events[0][0] <= clock.now:
            at, _, rec, start = heapq.heappop(events)
            o = Outcome(rec, at, start)
            outcomes[rec.id] = o
            req = _request(rec, at, start)
            if req is None:  # the workflow's deadline passed before this stage was released
                o.rejected = o.hopeless = True
                finish(o)
                continue
            sched.add_request(req)
            # As the engine does: only the slo policy refuses hopeless requests.
            reject = config.reject_hopeless and config.policy == "slo"
            if reject and sched.unattainable(rec.id) is not None:
                sched.finish_request(rec.id, RequestStatus.FINISHED_ABORTED)
                o.rejected = o.hopeless = True
                finish(o)
                continue
            live[rec.id] = o
        if not sched.has_unfinished_requests():
            if events:
                clock.now = events[0][0]
            continue
        if config.fast_forward and (k := decode_stretch(sched, _TOKEN)):
            until = events[0][0] if events else math.inf
            clock.now, steps, shapes, done = run_decodes(
                sched, truth, clock.now, until, k, _TOKEN, clock
            )
            num_steps += steps
            for _, dt in shapes:  # in step order, as the full path adds them
                busy += dt
            if log_steps:
                log.extend(shapes)
            for req in done:  # as update_from_output reports them
                o = live.pop(req.request_id)
                o.finish = clock.now
                o.hopeless = req.slo_hopeless
                finish(o)
            if steps:
                continue
        out = sched.schedule()
        if out.is_empty:  # nothing can run until something arrives
            if not events:
                raise RuntimeError("simulation stalled: requests wait but nothing can run")
            clock.now = max(clock.now, events[0][0])
            continue
        shape = StepShape.of(out)
        dt = truth.predict(shape)
        if log_steps:
            log.append((shape, dt))
        clock.now += dt
        busy += dt
        num_steps += 1
        sched.observe_step(out, dt, shape)
        sampled = {s.req.request_id: [_TOKEN] for s in out.seqs if s.sample}
        for co in sched.update_from_output(out, ModelRunnerOutput(sampled)):
            o = live[co.req.request_id]
            if o.first_token is None and co.new_token_ids:
                o.first_token = clock.now
            if co.finished:
                o.finish = clock.now
                o.hopeless = co.req.slo_hopeless
                del live[co.req.request_id]
                finish(o)
    return SimResult(outcomes, clock.now, num_steps, busy, log)


def _request(rec: TraceRecord, release: float, wf_start: float) -> Request | None:
    slo = dict(rec.slo) if rec.slo else None
    if slo and "deadline_ms" in slo:
        left = slo["deadline_ms"] - (release - wf_start) * 1000.0
        if left <= 0.0:
            return None
        slo["deadline_ms"] = left
    params = SamplingParams(
        max_tokens=rec.output_tokens, ignore_eos=True, slo=slo, workflow=rec.workflow
    )
    return Request(
        rec.id,
        prompt_ids(rec),
        params,
        max_tokens=rec.output_tokens,
        arrival_time=release,
    )
