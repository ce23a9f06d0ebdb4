"""The slo policy's hold: pure decode steps keep the last full decision for a few steps.

The full decision (`SloStep.begin`) takes every request's key afresh, sheds load, sorts the
running list and picks the requests that sit the step out. In a stretch of pure decode steps
little of it moves from one step to the next, so a step may keep the last decision -- the
running order, the deferred and the doomed -- for at most `SloKnobs.hold_steps` steps, while
- nothing waits, and nothing was added, finished or preempted since that decision (the
  scheduler's `num_changes`);
- every running request that is not deferred decodes one token;
- every deferred request would still be deferred at this step's time: its key, taken afresh,
  ranks it after the `min_batch` most urgent of the last decision, and the deferral condition
  (`slo_step.sits_out`, the one the full decision uses) still holds.
The keys of the requests that run are not taken afresh meanwhile, so such a request is found
hopeless, doomed, or able to sit out up to `hold_steps` steps late. The simulator applies held
steps in one go (sim/fast_forward.py), calling the same check for each.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from tokenmill.request import Request

if TYPE_CHECKING:
    from tokenmill.core.scheduler import Scheduler


class Hold:
    def __init__(self, steps: int, min_batch: int) -> None:
        self.steps = steps
        self.min_batch = min_batch
        self.mark: int | None = None  # `num_changes` at the last full decision (None: no hold)
        self.held = 0  # steps held since
        # The key of the least urgent of the `min_batch` most urgent then (None: fewer ran).
        self.bar: tuple | None = None
        # The deferred requests with their places in the running list, taken at the first
        # check of a hold: while it holds, nothing was added, finished, preempted or sorted.
        self._deferred: list[tuple[int, Request]] | None = None

    def decided(self, sched: Scheduler, key: Callable[[Request], tuple]) -> None:
        """Notes a full decision; it may be held if nothing waits after it."""
        self.mark = None if sched.waiting else sched.num_changes
        self.held = 0
        mb = self.min_batch
        self.bar = key(sched.running[mb - 1]) if len(sched.running) >= mb else None
        self._deferred = None

    def may_hold(self, sched: Scheduler) -> bool:
        """Whether the last full decision may still be held (the checks on no request)."""
        return self.mark == sched.num_changes and self.held < self.steps

    def decodes(self, sched: Scheduler, defer: set[str]) -> bool:
        """Whether every running request outside `defer` (at least one) decodes one token."""
        runs = False
        for req in sched.running:
            if req.request_id not in defer:
                if req.num_computed_tokens != req.num_tokens - 1:
                    return False
                runs = True
        return runs

    def still_deferred(
        self,
        sched: Scheduler,
        defer: set[str],
        key: Callable[[Request], tuple],
        sits_out: Callable[[Request, tuple], bool],
    ) -> bool:
        """Whether every request in `defer` would still be deferred, by its key now."""
        rows = self._deferred
        if rows is None:
            rows = [(i, r) for i, r in enumerate(sched.running) if r.request_id in defer]
            self._deferred = rows
        bar, mb = self.bar, self.min_batch
        for i, req in rows:
            k = key(req)
            # Before the bar it would be among the most urgent (a doomed one is already).
            if i >= mb and bar is not None and k < bar:
                return False
            if not sits_out(req, k):
                return False
        return True
