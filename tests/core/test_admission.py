"""Cache-aware admission: longest cached prefix first on a short queue, the policy order on a long
one, no starvation, and requests in flight that share a prefix compute it once."""

from __future__ import annotations

from sched_utils import FakeRunner, make_req, make_sched, reference, run

from tokenmill.core.sched_types import SchedulerOutput
from tokenmill.core.scheduler import Scheduler
from tokenmill.request import Request, RequestStatus

DOC = [(7 * i + 3) % 50 for i in range(24)]  # 6 blocks of 4


def first_starts(sched: Scheduler, arrivals: list[list[Request]], runner: FakeRunner) -> dict:
    """Runs to the end; returns request id -> (step of its first chunk, its start position)."""
    starts: dict[str, tuple[int, int]] = {}
    step = 0

    def record(out: SchedulerOutput) -> None:
        nonlocal step
        for s in out.seqs:
            starts.setdefault(s.req.request_id, (step, s.start_pos))
        step += 1

    outputs = run(sched, arrivals, on_step=record, runner=runner)
    for req in (r for reqs in arrivals for r in reqs):
        assert outputs[req.request_id] == reference(req, sched.config.max_model_len)
    return starts


def warm(sched: Scheduler, runner: FakeRunner, prompt: list[int]) -> None:
    run(sched, [[make_req(prompt, max_tokens=1)]], runner=runner)


def test_longest_cached_prefix_first_when_queue_is_short() -> None:
    for max_waiting, expect_first in ((128, "hit"), (0, "miss"), (1, "miss")):
        # one sequence at a time: the admission order is the run order
        sched = make_sched(max_num_seqs=1, cache_aware_max_waiting=max_waiting)
        runner = FakeRunner(4)
        warm(sched, runner, DOC + [1])
        miss = make_req([9, 9, 9, 9, 9], rid="miss")
        hit = make_req(DOC + [2, 3], rid="hit")
        starts = first_starts(sched, [[miss, hit]], runner)
        first = min(starts, key=lambda rid: starts[rid][0])
        assert first == expect_first, (max_waiting, starts)
        assert starts["hit"][1] == 24  # hit either way, only its order changes
        assert sched.kv_cache_manager.prefix_hits >= 24


def test_priority_classes_are_never_reordered() -> None:
    sched = make_sched(max_num_seqs=1, policy="priority")
    runner = FakeRunner(4)
    warm(sched, runner, DOC + [1])
    urgent_miss = make_req([9, 9, 9, 9, 9], rid="urgent-miss", priority=0)
    lazy_hit = make_req(DOC + [2], rid="lazy-hit", priority=1)
    hit = make_req(DOC + [3], rid="hit", priority=0)
    miss = make_req([8, 8, 8, 8, 8], rid="miss", priority=0)
    starts = first_starts(sched, [[lazy_hit, urgent_miss, miss, hit]], runner)
    order = sorted(starts, key=lambda rid: starts[rid][0])
    assert order == ["hit", "urgent-miss", "miss", "lazy-hit"]


def test_request_without_hit_is_not_starved() -> None:
    """A stream of cache-hitting requests arrives every step; the one without a hit is passed over
    at most max_passed_over times, then goes first."""
    max_passed = 3
    sched = make_sched(max_num_seqs=1, max_passed_over=max_passed)
    runner = FakeRunner(4)
    warm(sched, runner, DOC + [1])
    loner = make_req([9, 9, 9, 9, 9], rid="loner", max_tokens=1)
    arrivals = [[loner, make_req(DOC + [2], rid="hit-0", max_tokens=1)]]
    arrivals += [[make_req(DOC + [3, i], rid=f"hit-{i}", max_tokens=1)] for i in range(1, 12)]
    starts = first_starts(sched, arrivals, runner)
    passed_by = [rid for rid in starts if starts[rid][0] < starts["loner"][0]]
    assert len(passed_by) == max_passed, sorted(starts.items(), key=lambda kv: kv[1])
    assert not sched.admission.num_passed_over  # nothing left behind for finished requests


def test_a_round_that_admits_no_one_passes_no_one_over() -> None:
    sched = make_sched(max_passed_over=2)
    warm(sched, FakeRunner(4), DOC + [1])
    miss = make_req([9, 9, 9, 9, 9], rid="miss")
    hit = make_req(DOC + [2], rid="hit")
    other = make_req([8, 8, 8, 8, 8], rid="other")
    waiting = [miss, hit, other]  # policy order
    for _ in range(3):  # memory is full, say: nobody is admitted, step after step
        sched.admission.start_round(waiting, []).close()
    assert not sched.admission.num_passed_over
    admission = sched.admission.start_round(waiting, [])
    assert [r.request_id for r in admission.reqs] == ["hit", "miss", "other"]
    admission.admit(hit)
    admission.close()  # "hit" went ahead of "miss" only
    assert sched.admission.num_passed_over == {"miss": 1}
    for req in waiting:  # drop the lookups' hashes
        req.status = RequestStatus.FINISHED_ABORTED
        sched.kv_cache_manager.free(req)


def test_order_preempted_then_starving_then_longest_hit() -> None:
    sched = make_sched(max_passed_over=2)
    warm(sched, FakeRunner(4), DOC + [1])
    kv = sched.kv_cache_manager
    short_hit = make_req(DOC[:9], rid="short-hit")  # 2 blocks
    miss = make_req([9, 9, 9, 9, 9], rid="miss")
    preempted = make_req([8, 8, 8], rid="preempted", status=RequestStatus.PREEMPTED)
    long_hit = make_req(DOC + [2], rid="long-hit")  # 6 blocks
    waiting = [short_hit, miss, preempted, long_hit]  # policy order

    def order() -> list[str]:
        return [r.request_id for r in sched.admission.start_round(waiting, []).reqs]

    assert order() == ["preempted", "long-hit", "short-hit", "miss"]
    sched.admission.num_passed_over["miss"] = 2
    # urgent requests (preempted, starving) keep their policy order among themselves
    assert order() == ["miss", "preempted", "long-hit", "short-hit"]
    sched.admission.max_waiting = 3  # a long queue: the policy order
    assert order() == ["short-hit", "miss", "preempted", "long-hit"]
    for req in waiting:  # drop the lookups' hashes
        req.status = RequestStatus.FINISHED_ABORTED
        kv.free(req)


def test_in_flight_prefix_is_computed_once() -> None:
    """Two requests sharing a 24-token prefix arrive together and both fit the token budget: the
    second waits one step while the first computes the shared blocks, then hits all of them."""
    for max_waiting in (128, 0):
        sched = make_sched(cache_aware_max_waiting=max_waiting)
        runner = FakeRunner(4)
        computed: dict[str, int] = {}

        def count(out: SchedulerOutput, computed: dict[str, int] = computed) -> None:
            for s in out.seqs:
                if s.req.num_output_tokens == 0:
                    computed[s.req.request_id] = computed.get(s.req.request_id, 0) + s.num_tokens

        first = make_req(DOC + [1, 2], rid="first", max_tokens=3)
        second = make_req(DOC + [3, 4, 5], rid="second", max_tokens=3)
        outputs = run(sched, [[first, second]], on_step=count, runner=runner)
        for req in (first, second):
            assert outputs[req.request_id] == reference(req, 256)
        assert computed["first"] == 26
        if max_waiting:
            assert second.num_cached_tokens == 24 and computed["second"] == 3
        else:  # policy order: both start at once and the prefix is computed twice
            assert second.num_cached_tokens == 0 and computed["second"] == 27


def test_arrival_mid_prefill_waits_for_the_rest_of_the_prefix() -> None:
    """The first request's prompt runs in chunks of 10 (steps 0, 1, 2); the second arrives at
    step 1. At step 2 budget is left for it, but block 5 of the shared prefix is being computed
    right then: it waits for step 3 and hits 24 tokens instead of computing 4 of them again."""
    for max_waiting, expected in ((128, (3, 24)), (0, (2, 20))):
        sched = make_sched(max_num_batched_tokens=10, cache_aware_max_waiting=max_waiting)
        first = make_req(DOC + [1, 2], rid="first", max_tokens=2)
        second = make_req(DOC + [3], rid="second", max_tokens=2)
        starts = first_starts(sched, [[first], [second]], FakeRunner(4))
        assert starts["second"] == expected
        assert second.num_cached_tokens == expected[1]
