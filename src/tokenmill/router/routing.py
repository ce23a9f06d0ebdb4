"""The router's state: the workers, the radix tree of what each served, the policy, counters.

`route` picks a healthy worker the request has not tried yet, records the text as served there
(whatever the policy, so the tree's estimate of cached prefixes, which predicted work and the
hit metrics use, is the same for every policy) and opens the request's `Ticket`.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

from tokenmill.router.policy import Policy, predicted_prompt_work
from tokenmill.router.radix import ApproxRadixTree
from tokenmill.router.request_info import RouteInfo
from tokenmill.router.workers import Ticket, Worker, WorkerPool

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decision:
    worker: Worker
    ticket: Ticket
    reason: str
    cached_chars: int  # the tree's estimate of the prefix the worker holds


class Router:
    def __init__(self, pool: WorkerPool, policy: Policy, tree: ApproxRadixTree) -> None:
        self.pool = pool
        self.policy = policy
        self.tree = tree
        self.decisions: Counter[str] = Counter()  # reason -> count
        self.retries: Counter[str] = Counter()  # worker url -> requests retried away from it
        self.prompt_tokens = 0  # predicted, over routed requests (first tries only)
        self.estimated_cached_tokens = 0

    def route(self, info: RouteInfo, exclude: set[str], retry: bool = False) -> Decision | None:
        candidates = [w for w in self.pool.healthy() if w.url not in exclude]
        if not candidates:
            return None
        match = self.tree.match(info.text)
        tree_chars = {w.url: self.tree.tenant_chars(w.url) for w in candidates}
        choice = self.policy.choose(info, candidates, match, tree_chars)
        worker = choice.worker
        cached = match.per_tenant.get(worker.url, 0)
        if info.text:
            self.tree.insert(info.text, worker.url)
        self.decisions[choice.reason] += 1
        if not retry:
            self.prompt_tokens += info.prompt_tokens
            self.estimated_cached_tokens += info.prompt_tokens - predicted_prompt_work(info, cached)
        ticket = Ticket(worker, predicted_prompt_work(info, cached), info.max_new_tokens)
        return Decision(worker, ticket, choice.reason, cached)

    def retried(self, worker: Worker) -> None:
        self.retries[worker.url] += 1

    def mark_unhealthy(self, worker: Worker, why: str) -> None:
        if worker.healthy:
            logger.warning("worker %s leaves the rotation: %s", worker.url, why)
            worker.healthy = False
            # Whatever it cached may be gone by the time it comes back (a restart).
            self.tree.remove_tenant(worker.url)

    def mark_healthy(self, worker: Worker) -> None:
        worker.consecutive_failures = 0
        if not worker.healthy:
            logger.warning("worker %s is back in the rotation", worker.url)
            worker.healthy = True
