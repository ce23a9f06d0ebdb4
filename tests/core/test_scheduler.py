from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sched_utils import VOCAB, FakeRunner, make_req, make_sched, reference, run

from tokenmill.config import EngineConfig
from tokenmill.core.kv_group import KVGroupSpec
from tokenmill.core.sched_types import ModelRunnerOutput, SchedulerOutput, TopLogprobs
from tokenmill.core.scheduler import SchedulerConfig
from tokenmill.request import Request, RequestStatus
from tokenmill.sampling_params import SamplingParams


def test_config_comes_from_the_validated_engine_config() -> None:
    """EngineConfig refuses bad values, naming the field; SchedulerConfig takes them as they are
    (from_engine_config) and only asserts its invariants."""
    with pytest.raises(ValueError, match="max_num_seqs"):
        EngineConfig(max_num_seqs=0)
    with pytest.raises(ValueError, match="policy"):
        EngineConfig(scheduling_policy="lifo")
    with pytest.raises(ValueError, match="max_model_len"):
        EngineConfig(max_model_len=0)
    engine_config = EngineConfig(
        max_num_batched_tokens=32,
        max_num_seqs=3,
        block_size=8,
        enable_prefix_caching=False,
        scheduling_policy="priority",
        cache_aware_max_waiting=0,
    )
    groups = (KVGroupSpec(20), KVGroupSpec(6, 16))
    config = SchedulerConfig.from_engine_config(engine_config, max_model_len=100, kv_groups=groups)
    assert config == SchedulerConfig(
        max_num_batched_tokens=32,
        max_num_seqs=3,
        max_model_len=100,
        block_size=8,
        kv_groups=groups,
        enable_prefix_caching=False,
        policy="priority",
        cache_aware_max_waiting=0,
        max_forced_tokens=16,  # the engine's default, carried over
    )
    with pytest.raises(AssertionError):
        make_sched(max_num_seqs=0)
    with pytest.raises(AssertionError):
        make_sched(policy="lifo")
    with pytest.raises(AssertionError):
        make_sched(kv_groups=())


def test_prompts_are_the_engines_to_refuse() -> None:
    """The engine refuses bad prompts and reused ids (tests/engine/test_errors.py); one that
    reaches the scheduler anyway breaks its invariants."""
    sched = make_sched(max_model_len=10)
    with pytest.raises(AssertionError, match="11"):
        sched.add_request(make_req(list(range(11))))
    with pytest.raises(AssertionError):
        sched.add_request(make_req([]))
    sched.add_request(make_req(list(range(10)), rid="x"))
    with pytest.raises(AssertionError, match="'x'"):
        sched.add_request(make_req([1], rid="x"))
    assert list(sched.requests) == ["x"] and sched.num_waiting == 1
    # the KV cache size caps the context length
    assert make_sched(num_blocks=2, block_size=4).max_model_len == 8


def test_chunked_prefill_then_decode() -> None:
    sched = make_sched(max_num_batched_tokens=8)
    req = make_req(list(range(20)), max_tokens=2)
    steps: list[tuple[int, int, bool]] = []
    run(
        sched,
        [[req]],
        on_step=lambda o: steps.extend((s.start_pos, s.num_tokens, s.sample) for s in o.seqs),
    )
    assert steps == [(0, 8, False), (8, 8, False), (16, 4, True), (20, 1, True)]
    assert req.status == RequestStatus.FINISHED_LENGTH and len(req.output_token_ids) == 2


def test_splitfuse_decodes_first_then_prompt_chunks_fill_budget() -> None:
    sched = make_sched(max_num_batched_tokens=10)
    a = make_req([1, 2, 3], max_tokens=10)
    b = make_req(list(range(30)), max_tokens=2)
    seen: list[list[tuple[str, int]]] = []
    run(
        sched,
        [[a], [b]],
        on_step=lambda o: seen.append([(s.req.request_id, s.num_tokens) for s in o.seqs]),
    )
    ida, idb = a.request_id, b.request_id
    assert seen[:5] == [
        [(ida, 3)],
        [(ida, 1), (idb, 9)],
        [(ida, 1), (idb, 9)],
        [(ida, 1), (idb, 9)],
        [(ida, 1), (idb, 3)],
    ]


def test_prompt_admitted_only_when_whole_remainder_fits() -> None:
    # 6 blocks of 4: A (10 + 2 tokens) leaves 3 blocks, too few for B's 16-token prompt. Taking B
    # chunk by chunk would start it now and preempt it in the next step.
    sched = make_sched(max_num_batched_tokens=12, num_blocks=6, block_size=4)
    a = make_req(list(range(10)), max_tokens=2)
    b = make_req(list(range(20, 36)), max_tokens=2)
    admitted: list[list[str]] = []
    run(sched, [[a, b]], on_step=lambda o: admitted.append([s.req.request_id for s in o.seqs]))
    assert admitted[0] == [a.request_id] and sched.num_preemptions == 0


WORKLOAD_PREFIX = [7, 3, 9, 1, 4, 4, 8, 2, 6, 5]


def workload() -> list[list[Request]]:
    arrivals: list[list[Request]] = [[] for _ in range(7)]
    for i in range(14):
        prompt = WORKLOAD_PREFIX[: (i * 3) % 11] + [(i * 7 + j) % VOCAB for j in range(3 + i % 9)]
        eos = frozenset({13}) if i % 3 == 0 else frozenset()
        req = make_req(prompt, max_tokens=4 + (i * 5) % 17, rid=f"w{i}", eos_token_ids=eos)
        arrivals[i // 2].append(req)
    return arrivals


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(num_blocks=16, block_size=4),  # tiny cache: preemptions
        dict(num_blocks=40, block_size=1, max_num_batched_tokens=3),
        dict(max_num_batched_tokens=1),
        dict(max_num_seqs=2),
        dict(enable_prefix_caching=False, num_blocks=12, block_size=8),
        dict(policy="priority", num_blocks=16),
    ],
)
def test_outputs_identical_whatever_budget_cache_and_policy(kw: dict) -> None:
    arrivals = workload()
    if kw.get("policy") == "priority":
        for i, req in enumerate(itertools.chain(*arrivals)):
            req.priority = i % 3
    sched = make_sched(max_model_len=40, **kw)
    outputs = run(sched, arrivals)
    for req in itertools.chain(*arrivals):
        assert outputs[req.request_id] == reference(req, 40), req.request_id
    if kw.get("num_blocks", 64) <= 16:
        assert sched.num_preemptions > 0
        assert sum(r.num_preemptions for r in itertools.chain(*arrivals)) == sched.num_preemptions


def test_prefix_cache_schedules_only_uncached_tail() -> None:
    sched = make_sched()
    first = make_req(list(range(20)), max_tokens=6, cache_salt="t")
    runner = FakeRunner(sched.config.block_size)
    run(sched, [[first]], runner=runner)
    starts: dict[str, int] = {}

    def record(out: SchedulerOutput) -> None:
        for s in out.seqs:
            starts.setdefault(s.req.request_id, s.start_pos)

    same = make_req(list(range(20)), cache_salt="t")
    longer = make_req(first.all_token_ids[:24] + [1, 2], cache_salt="t")
    exact = make_req(list(range(16)), cache_salt="t")
    other_salt = make_req(list(range(20)), cache_salt="u")
    run(sched, [[same], [longer], [exact], [other_salt]], on_step=record, runner=runner)
    assert starts[same.request_id] == 16 and same.num_cached_tokens == 16
    assert starts[longer.request_id] == 24  # blocks holding first's generated tokens hit too
    assert starts[exact.request_id] == 12  # full hit: the last block is recomputed
    assert starts[other_salt.request_id] == 0 and other_salt.num_cached_tokens == 0
    kv = sched.kv_cache_manager
    assert kv.prefix_hits == 16 + 24 + 12 and 0 < kv.prefix_hit_rate < 1


def test_siblings_wait_for_first_prompt_then_share_blocks() -> None:
    sched = make_sched(max_num_batched_tokens=6)
    prompt = list(range(11))
    sibs = [
        make_req(prompt, max_tokens=3, rid=f"p-{i}", parent_id="p", sample_index=i)
        for i in range(3)
    ]
    first_steps: dict[str, int] = {}
    shared: list[list[int]] = []

    def on_step(out: SchedulerOutput) -> None:
        step = len(shared)
        for s in out.seqs:
            first_steps.setdefault(s.req.request_id, step)
        pool = sched.kv_cache_manager.groups[0].pool
        shared.append([pool.blocks[i].ref_cnt for i in (0, 1)])

    out = run(sched, [sibs], on_step=on_step)
    # Prompt of 11 tokens in chunks of 6: steps 0 and 1; siblings join at step 2.
    assert first_steps == {"p-0": 0, "p-1": 2, "p-2": 2}
    assert shared[2] == [3, 3]
    assert sibs[1].num_cached_tokens == sibs[2].num_cached_tokens == 8
    assert out["p-0"] == out["p-1"] == out["p-2"]


class ScriptRunner:
    def __init__(self, tokens: list[list[int]]) -> None:
        self.tokens = tokens

    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        lp = TopLogprobs(token_id=0, logprob=-0.5, rank=1, top_ids=[0], top_logprobs=[-0.5])
        sampled = {s.req.request_id: self.tokens.pop(0) for s in out.seqs if s.sample}
        return ModelRunnerOutput(
            sampled,
            logprobs={rid: [lp] * len(t) for rid, t in sampled.items()},
            prompt_logprobs={s.req.request_id: [lp] for s in out.seqs if s.start_pos == 0},
        )


def drive(req: Request, tokens: list[list[int]], **kw: object) -> list:
    sched = make_sched(**kw)
    sched.add_request(req)
    runner, outs = ScriptRunner(tokens), []
    while sched.has_unfinished_requests():
        out = sched.schedule()
        outs.extend(sched.update_from_output(out, runner.execute(out)))
    assert sched.kv_cache_manager.num_free_blocks == sched.kv_cache_manager.num_blocks
    return outs


def test_stop_conditions() -> None:
    eos = frozenset({2})
    req = make_req([1], max_tokens=9, eos_token_ids=eos)
    drive(req, [[5], [2], [6]])
    assert req.output_token_ids == [5, 2] and req.status == RequestStatus.FINISHED_STOPPED
    assert req.stop_reason is None
    req = make_req([1], max_tokens=9, eos_token_ids=eos, sp=SamplingParams(min_tokens=2))
    drive(req, [[2], [2], [2]])
    assert req.output_token_ids == [2, 2, 2] and req.status == RequestStatus.FINISHED_STOPPED
    req = make_req([1], max_tokens=3, eos_token_ids=eos, sp=SamplingParams(ignore_eos=True))
    drive(req, [[2], [2], [2]])
    assert req.status == RequestStatus.FINISHED_LENGTH
    req = make_req([1], max_tokens=9, sp=SamplingParams(stop_token_ids=[8]))
    drive(req, [[3], [8]])
    assert req.status == RequestStatus.FINISHED_STOPPED and req.stop_reason == 8
    req = make_req([1], max_tokens=2, eos_token_ids=eos)
    drive(req, [[3], [2]])  # stop wins over length on the same token
    assert req.status == RequestStatus.FINISHED_STOPPED
    req = make_req([1, 1, 1], max_tokens=99)
    drive(req, [[4]] * 10, max_model_len=6)
    assert req.num_tokens == 6 and req.status == RequestStatus.FINISHED_LENGTH


def test_multi_token_update_stops_midway_and_passes_logprobs() -> None:
    req = make_req([1, 2, 3, 4, 5], max_tokens=9, eos_token_ids=frozenset({9}))
    outs = drive(req, [[4, 9, 7]], max_num_batched_tokens=3)
    assert req.output_token_ids == [4, 9]
    assert [o.new_token_ids for o in outs] == [[], [4, 9]]
    assert outs[0].new_prompt_logprobs is not None and outs[0].new_logprobs is None
    assert outs[1].finished and len(outs[1].new_logprobs or []) == 2


def test_abort_and_finish_request_free_blocks() -> None:
    sched = make_sched(max_num_batched_tokens=4, max_num_seqs=1)
    a, b, c = (make_req(list(range(10)), max_tokens=50) for _ in range(3))
    for r in (a, b, c):
        sched.add_request(r)
    runner = FakeRunner(4)
    out = sched.schedule()
    sched.update_from_output(out, runner.execute(out))
    assert sched.num_running == 1 and sched.num_waiting == 2 and sched.kv_cache_usage > 0
    out = sched.schedule()
    sched.abort_requests([a.request_id, b.request_id, "unknown"])
    assert a.status == b.status == RequestStatus.FINISHED_ABORTED
    assert sched.update_from_output(out, runner.execute(out)) == []  # a was in flight
    assert sched.kv_cache_usage == 0 and sched.get_request(a.request_id) is None
    out = sched.schedule()
    assert set(out.finished_req_ids) == {a.request_id, b.request_id}
    assert [s.req for s in out.seqs] == [c]
    assert sched.finish_request(c.request_id, RequestStatus.FINISHED_STOPPED, "END")
    assert c.stop_reason == "END" and not sched.has_unfinished_requests()
    assert not sched.finish_request(c.request_id, RequestStatus.FINISHED_STOPPED)
    sched.kv_cache_manager.groups[0].pool.check_integrity()


def test_priority_policy_order_and_victim() -> None:
    sched = make_sched(policy="priority", num_blocks=6, block_size=2, max_num_batched_tokens=64)
    low = make_req([1, 2, 3, 4], max_tokens=20, priority=5, rid="low")
    high = make_req([5, 6, 7, 8], max_tokens=20, priority=0, rid="high")
    order: list[list[str]] = []
    preempted: list[str] = []

    def on_step(out: SchedulerOutput) -> None:
        order.append([s.req.request_id for s in out.seqs])
        preempted.extend(out.preempted_req_ids)

    outputs = run(sched, [[low, high]], on_step=on_step)
    assert order[0] == ["high", "low"]
    assert preempted and set(preempted) == {"low"}  # the less urgent one always yields
    assert outputs["high"] == reference(high, 12) and outputs["low"] == reference(low, 12)


@settings(max_examples=100, deadline=None)
@given(
    data=st.data(),
    block_size=st.integers(1, 5),
    budget=st.integers(1, 24),
    max_num_seqs=st.integers(1, 6),
    caching=st.booleans(),
    policy=st.sampled_from(["fcfs", "priority"]),
    cache_aware_max_waiting=st.sampled_from([0, 2, 128]),
    max_passed_over=st.integers(1, 3),
)
def test_random_workloads_match_reference(
    data: st.DataObject,
    block_size: int,
    budget: int,
    max_num_seqs: int,
    caching: bool,
    policy: str,
    cache_aware_max_waiting: int,
    max_passed_over: int,
) -> None:
    max_model_len = 24
    num_blocks = data.draw(st.integers(-(-max_model_len // block_size), 30), label="num_blocks")
    sched = make_sched(
        max_num_batched_tokens=budget,
        max_num_seqs=max_num_seqs,
        max_model_len=max_model_len,
        block_size=block_size,
        num_blocks=num_blocks,
        enable_prefix_caching=caching,
        policy=policy,
        cache_aware_max_waiting=cache_aware_max_waiting,
        max_passed_over=max_passed_over,
    )
    prompts = st.lists(st.integers(0, 3), min_size=1, max_size=16)
    arrivals: list[list[Request]] = []
    for step in range(data.draw(st.integers(1, 6), label="num_steps")):
        reqs = []
        for j in range(data.draw(st.integers(0, 3))):
            prompt = data.draw(prompts)
            n = data.draw(st.integers(1, 2))
            for k in range(n):
                reqs.append(
                    make_req(
                        prompt,
                        max_tokens=data.draw(st.integers(1, 10)),
                        rid=f"{step}.{j}.{k}",
                        eos_token_ids=frozenset({0}),
                        priority=data.draw(st.integers(0, 2)),
                        parent_id=f"{step}.{j}" if n > 1 else None,
                        sample_index=k,
                    )
                )
        arrivals.append(reqs)
    outputs = run(sched, arrivals)
    for req in itertools.chain(*arrivals):
        assert outputs[req.request_id] == reference(req, max_model_len)
