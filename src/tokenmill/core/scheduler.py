"""Dynamic SplitFuse scheduler: every step fills one token budget, running requests first.

Each request has `num_tokens` and `num_computed_tokens`; a step gives a request some of its
uncomputed tokens. Decodes, prompt chunks, resumption after preemption and prefix-cache hits are
all the same thing. When KV blocks run out, the least urgent running request is preempted: its
blocks are freed and it is recomputed later (its own blocks usually still hit the prefix cache).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

from tokenmill.core.admission import CacheAwareAdmission
from tokenmill.core.admit_waiting import admit_waiting, make_seq
from tokenmill.core.kv_cache_manager import KVCacheManager
from tokenmill.core.output_update import apply_sampled_tokens, make_core_output
from tokenmill.core.policy import make_key, make_waiting_queue
from tokenmill.core.sched_config import SchedulerConfig
from tokenmill.core.sched_types import (
    EngineCoreOutput,
    ModelRunnerOutput,
    ScheduledSeq,
    SchedulerOutput,
    SchedulerStats,
)
from tokenmill.core.slo_step import SloStep, UrgentRoom
from tokenmill.core.spec_stats import SpecDecodeStats
from tokenmill.core.step_model import StepCostModel, StepShape
from tokenmill.request import Request, RequestStatus

logger = logging.getLogger(__name__)

__all__ = ["Scheduler", "SchedulerConfig"]


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        step_cost: StepCostModel | None = None,
    ) -> None:
        """`clock`: the time deadlines are measured on (the simulator's is simulated);
        `step_cost`: the model of step times that predicts remaining work (fitted online)."""
        self.config = config
        self.kv_cache_manager = KVCacheManager(
            config.kv_groups,
            config.block_size,
            config.enable_prefix_caching,
            max_step_tokens=config.max_num_batched_tokens,
        )
        # A request can never hold more KV than a group's whole pool; beyond that it would
        # preempt itself forever, so the pool caps the context length too. A windowed group
        # whose pool holds a window and a step's tokens never limits it.
        capacity = [
            g.pool.num_blocks * config.block_size
            for g in self.kv_cache_manager.groups
            if g.max_live_blocks is None or g.pool.num_blocks < g.max_live_blocks
        ]
        self.max_model_len = min([config.max_model_len, *capacity])
        if self.max_model_len < config.max_model_len:
            logger.warning(
                "KV cache holds only %d tokens; capping max_model_len %d to it",
                self.max_model_len,
                config.max_model_len,
            )
        self.requests: dict[str, Request] = {}
        self._arrival_seq: dict[str, int] = {}
        self._next_seq = 0
        self.step_cost = step_cost or StepCostModel()
        self._slo = SloStep(config, clock, self.step_cost, self._arrival_seq)
        self.slo = self._slo.tracker  # targets and slack (kept under every policy: metrics)
        if config.policy == "slo":
            self._key = self._slo.key
        else:
            self._key = make_key(config.policy, self._arrival_seq)
        self.waiting = make_waiting_queue(config.policy, self._key)
        self.running: list[Request] = []  # sorted by policy key: the last one is preempted first
        self._first_siblings: dict[str, Request] = {}  # parent_id -> sample_index 0
        self._finished_req_ids: list[str] = []
        self.num_preemptions = 0
        self.num_changes = 0  # requests added, finished or preempted: ends an slo hold
        self.spec_stats = SpecDecodeStats()
        self.admission = CacheAwareAdmission(self.kv_cache_manager, config)

    # ---------------------------------------------------------------- requests in and out

    def add_request(self, req: Request) -> None:
        """Queues a request the engine has validated: a new id, a prompt that fits."""
        assert req.request_id not in self.requests, f"request_id {req.request_id!r} is in use"
        assert 0 < req.num_tokens <= self.max_model_len, (req.num_tokens, self.max_model_len)
        req.status = RequestStatus.WAITING
        self.requests[req.request_id] = req
        self._arrival_seq[req.request_id] = self._next_seq
        self._next_seq += 1
        if req.parent_id is not None and req.sample_index == 0:
            self._first_siblings[req.parent_id] = req
        cached = 0
        if self.config.policy == "slo" and req.sampling_params.slo is not None:
            cached = self.kv_cache_manager.num_computed_tokens(req)  # the work it saves
        self.slo.add(req, cached)
        self.waiting.add(req)
        self.num_changes += 1

    def finish_request(
        self, req_id: str, status: RequestStatus, stop_reason: int | str | None = None
    ) -> bool:
        """Finish a request from outside (abort, stop string). False if it is not here."""
        assert status.finished, status
        req = self.requests.get(req_id)
        if req is None:
            return False
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
        else:
            self.waiting.remove(req)
        req.status = status
        req.stop_reason = stop_reason
        self._release(req)
        return True

    def abort_requests(self, req_ids: Iterable[str]) -> None:
        for req_id in req_ids:
            self.finish_request(req_id, RequestStatus.FINISHED_ABORTED)

    def _release(self, req: Request) -> None:
        assert req.is_finished
        self.kv_cache_manager.free(req)
        del self.requests[req.request_id]
        del self._arrival_seq[req.request_id]
        self.slo.pop(req.request_id)
        if req.parent_id is not None and self._first_siblings.get(req.parent_id) is req:
            del self._first_siblings[req.parent_id]
        self._finished_req_ids.append(req.request_id)
        self.num_changes += 1

    def get_request(self, req_id: str) -> Request | None:
        return self.requests.get(req_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def kv_cache_usage(self) -> float:
        return self.kv_cache_manager.usage

    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            num_preemptions=self.num_preemptions,
            kv_cache=self.kv_cache_manager.stats(),
            spec_decode=dataclasses.replace(self.spec_stats),
        )

    def decoding_requests(self) -> tuple[Request, ...]:
        """The running requests whose next step is a decode (one token left to compute), the
        ones speculative decoding may draft for: read them, `schedule(drafts)` takes the drafts.
        """
        return tuple(r for r in self.running if r.num_computed_tokens == r.num_tokens - 1)

    # ---------------------------------------------------------------- one step

    def schedule(self, drafts: Mapping[str, Sequence[int]] | None = None) -> SchedulerOutput:
        """One step's work. `drafts`: speculative tokens by request id, for requests among
        `decoding_requests()`; they hold for this step only (any request without an entry runs
        none), and the scheduler alone sets and clears `Request.spec_token_ids`."""
        drafts = drafts or {}
        for req in self.running:
            draft = drafts.get(req.request_id)
            if draft or req.spec_token_ids:  # no new list per request and step without drafts
                req.spec_token_ids = list(draft or ())
        budget = self.config.max_num_batched_tokens
        seqs: list[ScheduledSeq] = []
        room = self._slo.begin(self) if self.config.policy == "slo" else UrgentRoom()
        preempted: list[str] = []

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            # Drafts are ordinary tokens here: they take budget and KV slots, and are cut first
            # when the budget is short.
            num_pending = req.num_tokens + len(req.spec_token_ids) - req.num_computed_tokens
            num_new = min(num_pending, budget)
            if room.defer and req.request_id in room.defer:
                i += 1  # slack to spare: sits this step out, keeping its KV
                continue
            if (room.chunk or room.spare is not None) and num_pending > 1:
                num_new = self._slo.chunk_cap(req, num_new)
                if num_new <= 0:
                    i += 1  # the step is left to a first token about to miss its TTFT
                    continue
            if room.reserve and num_pending > 1 and self._key(req) > room.key:
                num_new = min(num_new, budget - room.reserve)  # an urgent prompt goes first
                if num_new <= 0:
                    i += 1
                    continue
            assert num_new > 0, f"running request {req.request_id} has nothing to compute"
            block_ids = self.kv_cache_manager.allocate_slots(req, num_new)
            if block_ids is None and req.spec_token_ids:
                req.spec_token_ids = []  # drafts are never worth a preemption
                num_new = min(req.num_tokens - req.num_computed_tokens, budget)
                block_ids = self.kv_cache_manager.allocate_slots(req, num_new)
            while block_ids is None:
                # running is sorted, so the victim is never one already scheduled this step.
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is req:
                    break
                block_ids = self.kv_cache_manager.allocate_slots(req, num_new)
            if block_ids is None:
                break
            seqs.append(make_seq(req, num_new, block_ids))
            budget -= num_new
            i += 1

        # After a preemption memory is short: admitting now would only thrash.
        if not preempted:
            budget = admit_waiting(self, seqs, budget)

        finished, self._finished_req_ids = self._finished_req_ids, []
        return SchedulerOutput(
            seqs=seqs,
            num_batched_tokens=self.config.max_num_batched_tokens - budget,
            preempted_req_ids=room.preempted + preempted,
            finished_req_ids=finished,
        )

    def unattainable(self, req_id: str) -> str | None:
        """Why a queued request cannot meet its SLO even if served first (None if it can)."""
        return self._slo.unattainable(self.requests[req_id], self.running)

    def observe_step(
        self, sched_out: SchedulerOutput, seconds: float, shape: StepShape | None = None
    ) -> None:
        """Feeds a measured step time to the step-cost model behind the slack estimates
        (`shape`: the step's, if the caller has it already)."""
        self._slo.observe(shape or StepShape.of(sched_out), seconds)

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.kv_cache_manager.free(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.spec_token_ids = []
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.num_changes += 1
        self.waiting.add_preempted(req)
        logger.debug("preempted %s (%d tokens)", req.request_id, req.num_tokens)

    # ---------------------------------------------------------------- after the forward pass

    def update_from_output(
        self, sched_out: SchedulerOutput, runner_out: ModelRunnerOutput
    ) -> list[EngineCoreOutput]:
        outputs: list[EngineCoreOutput] = []
        for seq in sched_out.seqs:
            req = seq.req
            if req.status != RequestStatus.RUNNING:
                continue  # aborted or finished since schedule()
            new_ids = apply_sampled_tokens(
                seq,
                runner_out,
                self.spec_stats,
                self.max_model_len,
                self.config.max_forced_tokens,
            )
            self.kv_cache_manager.cache_blocks(req, req.num_computed_tokens)
            if new_ids and self.slo.states:
                self.slo.on_output(req)
            if req.is_finished:
                self.running.remove(req)
                self._release(req)
            else:
                self.kv_cache_manager.release_out_of_window(req)
            out = make_core_output(seq, runner_out, new_ids)
            if out is not None:
                outputs.append(out)
        return outputs
