"""Runs stretches of pure decode steps without the scheduler's per-step machinery.

Under fcfs and priority a step in which nothing waits, nothing arrives and every running
request decodes one token is decided in advance: the next step is the same requests, one token
each, in the same order, for as long as no request finishes, no KV allocation fails and nothing
arrives. Under slo the same holds for the steps that keep the last full decision
(`SloStep.hold`, see `SloKnobs.hold_steps`): the requests it does not defer decode one token
each, in running order, while the deferred ones sit out and keep their KV; the hold's own check
is made for each step, as the scheduler makes it, and the first step that fails it is left to
the full path. A stretch is applied here with exactly the calls the scheduler would make for
each step (the hold's check, KV slots in running order, the sampled token, prefix caching of
full blocks, the step-cost model's observation of the step's shape), minus the schedule's
bookkeeping that changes nothing. `tests/core/test_simulator.py` checks that a run with
fast-forwarding equals one without.
"""

from __future__ import annotations

from typing import Protocol

from tokenmill.core.scheduler import Scheduler
from tokenmill.core.step_model import StepCostModel, StepShape
from tokenmill.request import Request


class Clock(Protocol):
    now: float


def decode_rows(sched: Scheduler) -> list[Request]:
    """The requests each step of a stretch runs: every running one, or under slo those that
    the held decision does not defer ([] where the last decision may not be held)."""
    if sched.config.policy != "slo":
        return sched.running
    slo = sched._slo
    if not slo.may_hold(sched):
        return []
    defer = slo.room.defer
    return [r for r in sched.running if r.request_id not in defer]


def decode_stretch(sched: Scheduler, token: int) -> int:
    """How many steps from now are pure decodes of the same requests if nothing arrives and
    KV blocks last (0: the next step needs the full path). Arrivals are the caller's to check,
    and under slo each step's hold is `run_decodes`'s."""
    if sched.waiting or not sched.running:
        return 0
    if sched._finished_req_ids or sched.admission.num_passed_over:
        return 0  # the next schedule() has bookkeeping to do
    rows = decode_rows(sched)
    if not rows or len(rows) > sched.config.max_num_batched_tokens:
        return 0
    steps = sched.max_model_len
    for req in rows:
        sp = req.sampling_params
        if (
            req.num_computed_tokens != req.num_tokens - 1
            or not req.output_token_ids  # its first token is still to come: report it
            or req.spec_token_ids
            or req.grammar is not None
            or token in sp.stop_token_ids
            or (not sp.ignore_eos and token in req.eos_token_ids)
        ):
            return 0
        # Steps before it could finish: by max_tokens, or by the context length.
        left = min(req.max_tokens - req.num_output_tokens, sched.max_model_len - req.num_tokens)
        steps = min(steps, left - 1)
    return max(0, steps)


def run_decodes(
    sched: Scheduler,
    truth: StepCostModel,
    now: float,
    until: float,
    max_steps: int,
    token: int,
    clock: Clock | None = None,
) -> tuple[float, int, list[tuple[StepShape, float]]]:
    """Applies up to `max_steps` pure decode steps, each starting before `until`; returns the
    new time, the steps run and their (shape, seconds). `clock`: the scheduler's, set to each
    step's start (the slo hold's check reads it; without it, slo runs no step here)."""
    kv = sched.kv_cache_manager
    group = kv.groups[0] if len(kv.groups) == 1 else None
    slo = sched._slo if sched.config.policy == "slo" else None
    if slo is not None and clock is None:
        return now, 0, []
    rows = decode_rows(sched)
    n = len(rows)
    bs = sched.config.block_size
    stats = sched.spec_stats
    tracker = sched.slo
    log: list[tuple[StepShape, float]] = []
    while len(log) < max_steps and now < until:
        # KV: the requests crossing into a new block this step must all get one, or the
        # scheduler would preempt: leave that step to it.
        if group is None:
            break
        need = sum(1 for r in rows if r.num_computed_tokens % bs == 0)
        if need > group.pool.num_free_blocks:
            break
        if slo is not None:
            clock.now = now  # type: ignore[union-attr]
            if slo.hold(sched) is None:
                break  # a full decision: the scheduler's (the failed check changed nothing)
        ctx = 0
        for req in rows:
            if req.num_computed_tokens % bs == 0:  # elsewhere its blocks hold the token
                assert kv.allocate_slots(req, 1) is not None
            ctx += req.num_computed_tokens + 1
        shape = StepShape(n, n, ctx)
        dt = truth.predict(shape)
        now += dt
        if clock is not None:
            clock.now = now
        log.append((shape, dt))
        sched.observe_step(None, dt, shape)  # type: ignore[arg-type]
        stats.num_decode_steps += n  # spec_stats.record(0, 1) for each sequence
        stats.num_decode_tokens += n
        for req in rows:
            req.output_token_ids.append(token)
            req.num_computed_tokens += 1
            if req.num_computed_tokens % bs == 0:  # a block filled up: offer it to the cache
                kv.cache_blocks(req, req.num_computed_tokens)
            if tracker.states:
                tracker.on_output(req)
            kv.release_out_of_window(req)
    return now, len(log), log
