"""The scheduler tests' harness: a fake model runner whose every token depends on its KV cache,
the reference output it must produce, request and scheduler builders, and a driver that checks
each step's invariants."""

from __future__ import annotations

import itertools
from collections.abc import Callable

from tokenmill.core.kv_group import KVGroupSpec
from tokenmill.core.sched_types import ModelRunnerOutput, SchedulerOutput
from tokenmill.core.scheduler import Scheduler, SchedulerConfig
from tokenmill.core.slo_knobs import SloKnobs
from tokenmill.core.step_model import StepCostModel
from tokenmill.request import Request
from tokenmill.sampling_params import SamplingParams

VOCAB = 50
ROOT = 12345


def mix(state: int, token: int) -> int:
    return hash((state, token)) & ((1 << 61) - 1)


def next_token(state: int) -> int:
    return state % VOCAB


class FakeRunner:
    """A deterministic "model" that really depends on its KV cache (one global KV group).

    The KV of position p is mix(KV of p - 1, token p), read back through the block table, and
    the next token is a function of the last KV. Every context slot is checked against the
    reference chain before use, so stale or shared-and-overwritten blocks fail loudly.
    """

    def __init__(self, block_size: int) -> None:
        self.bs = block_size
        self.slots: dict[tuple[int, int], int] = {}

    def _slot(self, block_ids: list[int], pos: int) -> tuple[int, int]:
        return block_ids[pos // self.bs], pos % self.bs

    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        sampled: dict[str, list[int]] = {}
        for seq in out.seqs:
            state = ROOT
            for pos, token in enumerate(seq.req.token_slice(0, seq.start_pos)):
                state = mix(state, token)
                assert self.slots[self._slot(seq.block_ids[0], pos)] == state, "corrupt KV"
            for j, token in enumerate(seq.token_ids):
                state = mix(state, token)
                self.slots[self._slot(seq.block_ids[0], seq.start_pos + j)] = state
            if seq.sample:
                sampled[seq.req.request_id] = [next_token(state)]
        return ModelRunnerOutput(sampled)


def reference(req: Request, max_model_len: int) -> list[int]:
    state = ROOT
    for token in req.prompt_token_ids:
        state = mix(state, token)
    out: list[int] = []
    while True:
        token = next_token(state)
        out.append(token)
        if len(out) > req.sampling_params.min_tokens and token in req.eos_token_ids:
            return out
        if len(out) >= req.max_tokens or len(req.prompt_token_ids) + len(out) >= max_model_len:
            return out
        state = mix(state, token)


_ids = itertools.count()


def make_req(
    prompt: list[int], max_tokens: int = 4, rid: str | None = None, **kw: object
) -> Request:
    sp = kw.pop("sp", None) or SamplingParams()
    return Request(rid or f"r{next(_ids)}", list(prompt), sp, max_tokens=max_tokens, **kw)


def make_sched(num_blocks: int = 64, sliding_window: int | None = None, **kw: object) -> Scheduler:
    """A scheduler over one KV cache group of `num_blocks` (windowed where given); `kv_groups`
    in `kw` gives several instead."""
    args: dict = dict(
        max_num_batched_tokens=64,
        max_num_seqs=16,
        max_model_len=256,
        block_size=4,
        kv_groups=(KVGroupSpec(num_blocks, sliding_window),),
    )
    args.update(kw)
    return Scheduler(SchedulerConfig(**args))


def check_step(sched: Scheduler, out: SchedulerOutput, ends: dict[str, int]) -> None:
    cfg = sched.config
    assert out.num_batched_tokens == sum(s.num_tokens for s in out.seqs)
    assert out.num_batched_tokens <= cfg.max_num_batched_tokens
    assert len(out.seqs) <= cfg.max_num_seqs
    ids = [s.req.request_id for s in out.seqs]
    assert len(set(ids)) == len(ids) and not set(ids) & set(out.preempted_req_ids)
    for rid in out.preempted_req_ids:
        ends.pop(rid, None)
    for s in out.seqs:
        req = s.req
        assert s.num_tokens > 0 and s.start_pos == req.num_computed_tokens
        assert s.token_ids == req.token_slice(s.start_pos, s.start_pos + s.num_tokens)
        assert s.sample == (s.start_pos + s.num_tokens == req.num_tokens)
        assert all(len(t) * cfg.block_size >= s.start_pos + s.num_tokens for t in s.block_ids)
        if req.request_id in ends:  # chunks continue exactly where the last one ended
            assert s.start_pos == ends[req.request_id]
        else:  # a (re)admission starts at a block-aligned prefix-cache hit
            assert s.start_pos % cfg.block_size == 0
        ends[req.request_id] = s.start_pos + s.num_tokens


def run(
    sched: Scheduler,
    arrivals: list[list[Request]],
    max_steps: int = 20_000,
    on_step: Callable[[SchedulerOutput], None] | None = None,
    runner: FakeRunner | None = None,
) -> dict[str, list[int]]:
    """Drive schedule -> fake model -> update until every request finished."""
    runner = runner or FakeRunner(sched.config.block_size)
    outputs: dict[str, list[int]] = {}
    ends: dict[str, int] = {}
    for step in range(max_steps):
        for req in arrivals[step] if step < len(arrivals) else ():
            sched.add_request(req)
            outputs[req.request_id] = []
        if step >= len(arrivals) and not sched.has_unfinished_requests():
            break
        oldest = sched.running[0] if sched.running else None
        out = sched.schedule()
        check_step(sched, out, ends)
        if oldest is not None:  # the most urgent running request always makes progress
            assert oldest in [s.req for s in out.seqs]
        if on_step:
            on_step(out)
        for o in sched.update_from_output(out, runner.execute(out)):
            outputs[o.req.request_id].extend(o.new_token_ids)
            if o.finished:
                assert o.req.is_finished and o.req.output_token_ids == outputs[o.req.request_id]
        for group in sched.kv_cache_manager.groups:
            group.pool.check_integrity()
    else:
        raise AssertionError("requests starved")
    kv = sched.kv_cache_manager
    assert kv.num_free_blocks == kv.num_blocks and not any(g.tables for g in kv.groups)
    assert not kv.req_to_block_hashes and sched.num_running == sched.num_waiting == 0
    return outputs


SLO_COEFFS = (0.01, 0.001, 0.0, 0.0)  # the slo tests' step costs: 10 ms a step, 1 ms a token


class Clock:
    """The clock a test injects and moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make_slo_sched(clock: Clock, **kw: object) -> Scheduler:
    """`make_sched` under the slo policy, on `clock`, with `SLO_COEFFS` as its step costs."""
    base = make_sched(policy="slo", **kw)
    return Scheduler(base.config, clock=clock, step_cost=StepCostModel(SLO_COEFFS))


def make_budget_sched(clock: Clock, knobs: SloKnobs) -> Scheduler:
    """`make_slo_sched` with a 512-token budget and room for long prompts: a 1500-token prompt
    takes several steps while others run beside it (the prompt-room tests)."""
    return make_slo_sched(
        clock, num_blocks=1024, slo_knobs=knobs, max_num_batched_tokens=512, max_model_len=4096
    )
