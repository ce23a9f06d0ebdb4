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
from tokenmill.request import Request, RequestStatus


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
    KV blocks last, the last of them possibly finishing some (0: the next step needs the full
    path). Arrivals are the caller's to check, and under slo each step's hold is
    `run_decodes`'s."""
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
        steps = min(steps, _steps_left(sched, req))
    return steps


def _steps_left(sched: Scheduler, req: Request) -> int:
    """Decode steps until `req` finishes (in the last of them): by max_tokens, or by the
    context length."""
    return min(req.max_tokens - req.num_output_tokens, sched.max_model_len - req.num_tokens)


def run_decodes(
    sched: Scheduler,
    truth: StepCostModel,
    now: float,
    until: float,
    max_steps: int,
    token: int,
    clock: Clock | None = None,
) -> tuple[float, int, list[tuple[StepShape, float]], list[Request]]:
    """Applies up to `max_steps` pure decode steps, each starting before `until`; returns the
    new time, the steps run, their (shape, seconds) and the requests that finished in the last
    one (released; the caller reports them). `clock`: the scheduler's, set to each step's start
    (the slo hold's check reads it; without it, slo runs no step here)."""
    kv = sched.kv_cache_manager
    slo = sched._slo if sched.config.policy == "slo" else None
    rows = list(decode_rows(sched))  # running loses the rows that finish
    n = len(rows)
    # One group without a window (a windowed one gives blocks back as the window moves).
    if len(kv.groups) != 1 or kv.groups[0].window is not None or not n:
        return now, 0, [], []
    if slo is not None and clock is None:
        return now, 0, [], []
    group = kv.groups[0]
    pool = group.pool
    bs = sched.config.block_size
    stats = sched.spec_stats
    ends = min(_steps_left(sched, r) for r in rows)  # the step some row finishes in
    max_steps = min(max_steps, ends)
    # All rows advance one token a step, so the rows that cross into a new block at step j
    # are those at position -j of a block when the stretch starts: `phase` lists them in
    # running order. Tokens are appended lazily (`sync`): a row is brought up to date only
    # where a call reads it (KV allocation, prefix caching, the last step) and at the end; the
    # hold's check reads only that rows decode one token, which the lag does not change.
    phase: list[list[int]] = [[] for _ in range(bs)]
    for i, req in enumerate(rows):
        phase[req.num_computed_tokens % bs].append(i)
    synced = [0] * n  # steps applied to each row

    def sync(i: int, step: int) -> Request:
        req = rows[i]
        k = step - synced[i]
        if k:
            req.output_token_ids.extend([token] * k)
            req.num_computed_tokens += k
            synced[i] = step
        return req

    ctx = sum(r.num_computed_tokens for r in rows)
    log: list[tuple[StepShape, float]] = []
    done: list[Request] = []
    hold = slo.hold if slo is not None else None
    observe = sched._slo.observe  # what sched.observe_step does with the shape given
    predict = truth.predict_counts
    j = 0
    while j < max_steps and now < until:
        # KV: the requests crossing into a new block this step must all get one, or the
        # scheduler would preempt: leave that step to it.
        cross = phase[-j % bs]
        if cross and len(cross) > pool.num_free_blocks:
            break
        if hold is not None:
            clock.now = now  # type: ignore[union-attr]
            if hold(sched, decoding=j > 0) is None:  # rows still decode after step 0
                break  # a full decision: the scheduler's (the failed check changed nothing)
        for i in cross:  # elsewhere its blocks hold the token
            # kv.allocate_slots(req, 1), whose checks are made above: one group, no prefix
            # hit, a table since admission, a free block for each row crossing.
            req = sync(i, j)
            group.allocate(req.request_id, req.num_computed_tokens + 1, ())
        ctx += n  # each row reads its context and the new token
        shape = StepShape(n, n, ctx)
        dt = predict(n, n, ctx)  # truth.predict(shape)
        now += dt
        if clock is not None:
            clock.now = now
        log.append((shape, dt))
        observe(shape, dt)
        j += 1
        if j == ends:  # rows finish: every row's output as update_from_output applies it
            for i in range(n):
                req = sync(i, j)
                kv.cache_blocks(req, req.num_computed_tokens)
                if _steps_left(sched, req) == 0:
                    req.status = RequestStatus.FINISHED_LENGTH  # as check_stop sets it
                    sched.running.remove(req)
                    sched._release(req)
                    done.append(req)
            break
        # A block filled up: offer it to the cache. (tracker.on_output would change nothing:
        # every row has its first token already.)
        for i in phase[-j % bs]:
            req = sync(i, j)
            kv.cache_blocks(req, req.num_computed_tokens)
    for i in range(n):
        sync(i, j)
    # spec_stats.record(0, 1) for each sequence and step (nothing in a stretch reads them)
    stats.num_decode_steps += n * j
    stats.num_decode_tokens += n * j
    return now, j, log, done
