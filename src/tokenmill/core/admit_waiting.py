"""Admitting waiting requests into a step, and the sequences a step runs.

Waiting requests are tried in the admission round's order (core/admission.py: the policy's, or
cache-aware); under the slo policy a guard stops at the first one whose admission would make a
more urgent running request late (core/slo_admission.py). A request is admitted only when the
KV cache can hold its whole remainder.
"""

from __future__ import annotations

import bisect
from typing import TYPE_CHECKING

from tokenmill.core.kv_cache_manager import BlockTables
from tokenmill.core.sched_types import ScheduledSeq
from tokenmill.request import Request, RequestStatus

if TYPE_CHECKING:
    from tokenmill.core.scheduler import Scheduler


def admit_waiting(sched: Scheduler, seqs: list[ScheduledSeq], budget: int) -> int:
    """Admits waiting requests into this step, in the admission order, while budget, seats
    and KV blocks last; appends their sequences to `seqs` and returns the budget left."""
    kv = sched.kv_cache_manager
    admitted: list[Request] = []
    admission = sched.admission.start_round(sched.waiting, sched.running)
    slo = sched.config.policy == "slo"
    guarded = slo and sched.config.slo_knobs.guard
    guard = None  # built on the first request tried (over the running list as it is now)
    for req in admission.reqs:
        if budget <= 0 or len(sched.running) + len(admitted) >= sched.config.max_num_seqs:
            break
        if guarded and guard is None:
            guard = sched._slo.admission_guard(sched.running)
        if guard is not None and not guard.allows(req):
            break  # it would make a more urgent request late; so would everyone after it
        if req.grammar is not None and not req.grammar.ready:
            continue  # its grammar is still compiling: the others go ahead meanwhile
        if not _siblings_ready(sched, req):
            continue
        # Looked up again here: admitting an earlier request may have evicted blocks.
        computed_ids, num_cached = kv.get_computed_blocks(req)
        if admission.should_wait(req, num_cached):
            continue  # its next blocks are being computed: hit them next step instead
        num_remaining = req.num_tokens - num_cached
        # Admit only if the KV cache can hold the whole remainder: admitting chunk by chunk
        # lets several half-prefilled prompts fill the cache and deadlock.
        if not kv.can_allocate(req, num_remaining, computed_ids, num_cached):
            break
        num_new = min(num_remaining, budget)
        if slo and num_new > 1:
            num_new = sched._slo.chunk_cap(req, num_new)
            if num_new <= 0:
                continue  # the step is left to a first token about to miss its TTFT
        block_ids = kv.allocate_slots(req, num_new, computed_ids, num_cached)
        assert block_ids is not None
        if req.num_preemptions == 0:
            req.num_cached_tokens = num_cached
        req.num_computed_tokens = num_cached
        req.status = RequestStatus.RUNNING
        admitted.append(req)
        admission.admit(req)
        if guard is not None:
            guard.admit(req)
        seqs.append(make_seq(req, num_new, block_ids))
        budget -= num_new
    admission.close()
    for req in admitted:
        sched.waiting.remove(req)
        bisect.insort(sched.running, req, key=sched._key)
    return budget


def _siblings_ready(sched: Scheduler, req: Request) -> bool:
    """n > 1: later samples wait for the first one's prompt so they share its KV blocks."""
    if req.parent_id is None or req.sample_index == 0:
        return True
    first = sched._first_siblings.get(req.parent_id)
    return first is None or first.num_computed_tokens >= first.num_prompt_tokens


def make_seq(req: Request, num_new: int, block_ids: BlockTables) -> ScheduledSeq:
    """The step's sequence for `req`: its next `num_new` tokens (drafts last)."""
    start = req.num_computed_tokens
    end = start + num_new
    num_draft = max(0, end - req.num_tokens)
    token_ids = req.token_slice(start, end - num_draft)
    if num_draft:
        token_ids += req.spec_token_ids[:num_draft]
    req.spec_token_ids = []  # consumed: the next step's drafts come with its schedule()
    return ScheduledSeq(
        req=req,
        token_ids=token_ids,
        start_pos=start,
        block_ids=block_ids,
        sample=end >= req.num_tokens,
        num_draft_tokens=num_draft,
    )
