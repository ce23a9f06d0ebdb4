"""Routing policies: which healthy worker takes a request.

`cache_aware` (SGLang's router, with load counted in predicted tokens too): the worker believed
to hold the longest prefix of the request takes it when that prefix is at least
`cache_threshold` of the text, unless it is overloaded -- its predicted work exceeds the
least-loaded worker's by more than `balance_abs_tokens` and by more than a factor
`balance_rel`, or its outstanding requests exceed the fewest by more than
`balance_abs_requests` and by that factor -- in which case, and
when no worker holds enough of the prefix, the request goes to the worker with the least
predicted work, ties going to the fewest outstanding requests, then the smallest share of the
tree (the most room for a new prefix).
`least_load` is that fallback alone; `round_robin` ignores load and prefixes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from tokenmill.router.radix import PrefixMatch
from tokenmill.router.request_info import RouteInfo
from tokenmill.router.workers import Worker

POLICIES = ("cache_aware", "round_robin", "least_load")


@dataclass(frozen=True)
class Choice:
    worker: Worker
    reason: str  # "prefix" | "overloaded" | "no_prefix" | "least_load" | "round_robin"


class Policy(Protocol):
    def choose(
        self,
        info: RouteInfo,
        candidates: list[Worker],
        match: PrefixMatch,
        tree_chars: dict[str, int],
    ) -> Choice: ...


def predicted_prompt_work(info: RouteInfo, cached_chars: int) -> int:
    """Prompt tokens a worker holding `cached_chars` of the text would still compute."""
    return max(1, info.prompt_tokens - int(cached_chars / info.chars_per_token))


def _least_loaded(candidates: list[Worker], tree_chars: dict[str, int]) -> Worker:
    # A match below the cache threshold does not count: a short prefix every request shares
    # (a template's header) would otherwise pull every new prompt to the same idle worker.
    return min(candidates, key=lambda w: (w.work, w.outstanding, tree_chars[w.url]))


class CacheAwarePolicy:
    def __init__(
        self,
        cache_threshold: float = 0.5,
        balance_abs_tokens: int = 4096,
        balance_rel: float = 1.5,
        balance_abs_requests: int = 16,
    ) -> None:
        if not 0.0 <= cache_threshold <= 1.0:
            raise ValueError(f"cache_threshold must be in [0, 1], got {cache_threshold}")
        if balance_abs_tokens < 0:
            raise ValueError(f"balance_abs_tokens must be >= 0, got {balance_abs_tokens}")
        if balance_abs_requests < 0:
            raise ValueError(f"balance_abs_requests must be >= 0, got {balance_abs_requests}")
        if balance_rel < 1.0:
            raise ValueError(f"balance_rel must be >= 1, got {balance_rel}")
        self.cache_threshold = cache_threshold
        self.balance_abs_tokens = balance_abs_tokens
        self.balance_rel = balance_rel
        self.balance_abs_requests = balance_abs_requests

    def choose(
        self,
        info: RouteInfo,
        candidates: list[Worker],
        match: PrefixMatch,
        tree_chars: dict[str, int],
    ) -> Choice:
        least = _least_loaded(candidates, tree_chars)
        owned = [w for w in candidates if match.per_tenant.get(w.url, 0) > 0]
        if not owned or match.length == 0:
            return Choice(least, "no_prefix")
        owner = max(owned, key=lambda w: (match.per_tenant[w.url], -w.work, -w.outstanding))
        if match.per_tenant[owner.url] < self.cache_threshold * match.length:
            return Choice(least, "no_prefix")
        if self._overloaded(owner, candidates):
            return Choice(least, "overloaded")
        return Choice(owner, "prefix")

    def _overloaded(self, owner: Worker, candidates: list[Worker]) -> bool:
        # Spilling a prefix to a second worker costs one prefill there; from then on both hold
        # it and the tie between them goes to the less loaded (see `owner` above).
        lightest = min(w.work for w in candidates)
        fewest = min(w.outstanding for w in candidates)
        return (
            owner.work - lightest > self.balance_abs_tokens
            and owner.work > self.balance_rel * lightest
        ) or (
            owner.outstanding - fewest > self.balance_abs_requests
            and owner.outstanding > self.balance_rel * fewest
        )


class LeastLoadPolicy:
    def choose(
        self,
        info: RouteInfo,
        candidates: list[Worker],
        match: PrefixMatch,
        tree_chars: dict[str, int],
    ) -> Choice:
        return Choice(_least_loaded(candidates, tree_chars), "least_load")


class RoundRobinPolicy:
    def __init__(self) -> None:
        self._next = 0

    def choose(
        self,
        info: RouteInfo,
        candidates: list[Worker],
        match: PrefixMatch,
        tree_chars: dict[str, int],
    ) -> Choice:
        worker = candidates[self._next % len(candidates)]
        self._next += 1
        return Choice(worker, "round_robin")


def make_policy(
    name: str,
    cache_threshold: float = 0.5,
    balance_abs_tokens: int = 4096,
    balance_rel: float = 1.5,
    balance_abs_requests: int = 16,
) -> Policy:
    if name == "cache_aware":
        return CacheAwarePolicy(
            cache_threshold, balance_abs_tokens, balance_rel, balance_abs_requests
        )
    if name == "least_load":
        return LeastLoadPolicy()
    if name == "round_robin":
        return RoundRobinPolicy()
    raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {name!r}")
