"""Cache-aware admission: the order in which the scheduler tries its waiting requests.

While the waiting queue is short, the requests whose prompts have the longest cached prefix go
first: their prefill is cheapest, and their cached blocks could be evicted if they waited. A
request whose next uncached block is being computed right now by a running request waits a step
instead of computing the same KV a second time; it then hits those blocks (SGLang's in-batch
prefix sharing). A long queue falls back to the policy order (FCFS or priority): sorting it every
step would cost more than it saves, and arrival order is what bounds waiting times under load.

Reordering never crosses priority classes (policy "priority" orders by priority first), and it
never starves anyone: preempted requests (admitted once already) always go first, and a request
passed over `max_passed_over` times by requests behind it in policy order goes ahead of every
cache-ordered request of its class and no longer waits for in-flight blocks.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenmill.core.block_pool import BlockHash
from tokenmill.core.kv_cache_manager import KVCacheManager
from tokenmill.core.sched_config import SchedulerConfig
from tokenmill.request import Request, RequestStatus


class AdmissionRound:
    """One step's admission: `reqs` in the order to try, `should_wait`, then `close`."""

    def __init__(
        self,
        reqs: list[Request],
        policy_order: list[Request],
        admission: CacheAwareAdmission,
        in_flight: set[BlockHash] | None,
    ) -> None:
        self.reqs = reqs
        self._policy_order = policy_order
        self._admission = admission
        # Hashes of full blocks that admitted requests hold but have not computed yet; None in a
        # cache-blind round (long queue, caching off), which never defers anyone.
        self._in_flight = in_flight
        self._admitted: set[str] = set()

    def should_wait(self, req: Request, num_cached: int) -> bool:
        """True when a running request is computing this request's next block right now."""
        if self._in_flight is None or not self._in_flight:
            return False
        if self._admission.is_urgent(req):
            return False
        kv = self._admission.kv
        next_hash = kv.first_uncached_block_hash(req, num_cached)
        return next_hash is not None and next_hash in self._in_flight

    def admit(self, req: Request) -> None:
        self._admitted.add(req.request_id)
        if self._in_flight is not None:
            self._in_flight.update(self._admission.kv.uncomputed_block_hashes(req))

    def close(self) -> None:
        """Count, for every request still waiting, whether one behind it was admitted first."""
        passed = self._admission.num_passed_over
        last = -1  # the last admitted request's place in policy order (-1: none admitted)
        for i, req in enumerate(self._policy_order):
            if req.request_id in self._admitted:
                last = i
        for req in self._policy_order[: max(last, 0)]:  # a round that admits no one passes no one
            rid = req.request_id
            if rid not in self._admitted:
                passed[rid] = passed.get(rid, 0) + 1
        # Forget requests that left the queue (admitted, finished, aborted).
        waiting = {r.request_id for r in self._policy_order} - self._admitted
        for rid in [rid for rid in passed if rid not in waiting]:
            del passed[rid]


class CacheAwareAdmission:
    def __init__(self, kv: KVCacheManager, config: SchedulerConfig) -> None:
        self.kv = kv
        self.policy = config.policy
        self.max_waiting = config.cache_aware_max_waiting  # 0: always the policy order
        self.max_passed_over = config.max_passed_over
        self.num_passed_over: dict[str, int] = {}  # waiting request id -> times passed over

    def is_urgent(self, req: Request) -> bool:
        return (
            req.status == RequestStatus.PREEMPTED
            or self.num_passed_over.get(req.request_id, 0) >= self.max_passed_over
        )

    def start_round(self, waiting: Iterable[Request], running: Iterable[Request]) -> AdmissionRound:
        """The order to try `waiting` (given in policy order) in this step."""
        policy_order = list(waiting)
        # The slo policy's order is its point: cache hits never reorder it.
        cache_aware = (
            self.policy != "slo"
            and self.kv.enable_prefix_caching
            and 0 < len(policy_order) <= self.max_waiting
        )
        if not cache_aware:
            self.num_passed_over.clear()  # policy order: nobody is passed over
            return AdmissionRound(policy_order, policy_order, self, None)

        def key(item: tuple[int, Request]) -> tuple:
            pos, req = item
            urgent = self.is_urgent(req)
            num_cached = 0 if urgent else self.kv.num_computed_tokens(req)
            group = (req.priority,) if self.policy == "priority" else ()
            return (*group, not urgent, -num_cached, pos)

        ordered = [req for _, req in sorted(enumerate(policy_order), key=key)]
        in_flight: set[BlockHash] = set()
        for req in running:
            in_flight.update(self.kv.uncomputed_block_hashes(req))
        return AdmissionRound(ordered, policy_order, self, in_flight)
