"""Runs stretches of pure decode steps without the scheduler's per-step machinery.

Under fcfs and priority a step in which nothing waits, nothing arrives and every running
request decodes one token is decided in advance: the next step is the same requests, one token
each, in the same order, for as long as no request finishes, no KV allocation fails and nothing
arrives. Such a stretch is applied here with exactly the calls the scheduler would make for each
step (KV slots in running order, the sampled token, prefix caching of full blocks, the step-cost
model's observation), minus the schedule's bookkeeping that changes nothing. The slo policy
re-decides each step (slack moves with time), so it always takes the full path.
`tests/core/test_simulator.py` checks that a run with fast-forwarding equals one without.
"""

from __future__ import annotations

from tokenmill.core.scheduler import Scheduler
from tokenmill.core.step_model import StepCostModel, StepShape
from tokenmill.request import Request


def decode_stretch(sched: Scheduler, token: int) -> int:
    """How many steps from now are pure decodes of every running request whatever happens
    (0: the next step needs the full path). Arrivals are the caller's to check."""
    if sched.config.policy == "slo" or sched.waiting or not sched.running:
        return 0
    if sched._finished_req_ids or sched.admission.num_passed_over:
        return 0  # the next schedule() has bookkeeping to do
    if len(sched.running) > sched.config.max_num_batched_tokens:
        return 0
    steps = sched.max_model_len
    for req in sched.running:
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
) -> tuple[float, int, list[tuple[StepShape, float]]]:
    """Applies up to `max_steps` pure decode steps, each starting before `until`; returns the
    new time, the steps run and their (shape, seconds)."""
    kv = sched.kv_cache_manager
    group = kv.groups[0] if len(kv.groups) == 1 else None
    running: list[Request] = sched.running
    n = len(running)
    bs = sched.config.block_size
    stats = sched.spec_stats
    tracker = sched.slo
    log: list[tuple[StepShape, float]] = []
    while len(log) < max_steps and now < until:
        # KV: the requests crossing into a new block this step must all get one, or the
        # scheduler would preempt: leave that step to it.
        if group is None:
            break
        need = sum(1 for r in running if r.num_computed_tokens % bs == 0)
        if need > group.pool.num_free_blocks:
            break
        ctx = 0
        for req in running:
            if req.num_computed_tokens % bs == 0:  # elsewhere its blocks hold the token
                assert kv.allocate_slots(req, 1) is not None
            ctx += req.num_computed_tokens + 1
        shape = StepShape(n, n, ctx)
        dt = truth.predict(shape)
        now += dt
        log.append((shape, dt))
        sched.observe_step(None, dt, shape)  # type: ignore[arg-type]
        stats.num_decode_steps += n  # spec_stats.record(0, 1) for each sequence
        stats.num_decode_tokens += n
        for req in running:
            req.output_token_ids.append(token)
            req.num_computed_tokens += 1
            if req.num_computed_tokens % bs == 0:  # a block filled up: offer it to the cache
                kv.cache_blocks(req, req.num_computed_tokens)
            if tracker.states:
                tracker.on_output(req)
            kv.release_out_of_window(req)
    return now, len(log), log
