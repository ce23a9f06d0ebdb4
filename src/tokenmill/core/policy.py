"""Ordering policies: which waiting request is admitted next, which running one is preempted.

Every policy orders requests by a key (lower = more urgent). The running list is kept sorted by
that key, so the preemption victim is always its last element.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Callable, Iterator
from typing import Protocol

from tokenmill.request import Request

POLICIES = ("fcfs", "priority", "slo")

RequestKey = Callable[[Request], tuple]


def make_key(policy: str, arrival_seq: dict[str, int]) -> RequestKey:
    """Sort key for `policy`; `arrival_seq` breaks ties between equal arrival times."""
    if policy == "fcfs":
        return lambda r: (r.arrival_time, arrival_seq[r.request_id])
    if policy == "priority":
        return lambda r: (r.priority, r.arrival_time, arrival_seq[r.request_id])
    if policy == "slo":
        raise ValueError("the slo policy's key depends on time: see core/urgency.py")
    raise ValueError(f"policy must be one of {', '.join(POLICIES)}; got {policy!r}")


class WaitingQueue(Protocol):
    def add(self, req: Request) -> None: ...
    def add_preempted(self, req: Request) -> None: ...
    def remove(self, req: Request) -> None: ...
    def __iter__(self) -> Iterator[Request]: ...
    def __len__(self) -> int: ...


class FCFSQueue:
    """Arrival order; preempted requests go back to the front."""

    def __init__(self) -> None:
        self._queue: deque[Request] = deque()

    def add(self, req: Request) -> None:
        self._queue.append(req)

    def add_preempted(self, req: Request) -> None:
        self._queue.appendleft(req)

    def remove(self, req: Request) -> None:
        self._queue.remove(req)

    def __iter__(self) -> Iterator[Request]:
        return iter(self._queue)

    def __len__(self) -> int:
        return len(self._queue)


class SortedQueue:
    """Kept sorted by a key; preempted requests simply go back to their place."""

    def __init__(self, key: RequestKey) -> None:
        self._key = key
        self._items: list[Request] = []

    def add(self, req: Request) -> None:
        bisect.insort(self._items, req, key=self._key)

    def add_preempted(self, req: Request) -> None:
        self.add(req)

    def remove(self, req: Request) -> None:
        self._items.remove(req)

    def __iter__(self) -> Iterator[Request]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)


class SlackQueue:
    """Sorted when read: the slo policy's keys change from step to step (slack, hopelessness),
    so the order is taken afresh at each iteration with the key of the moment."""

    def __init__(self, key: RequestKey) -> None:
        self._key = key
        self._items: list[Request] = []

    def add(self, req: Request) -> None:
        self._items.append(req)

    def add_preempted(self, req: Request) -> None:
        self._items.append(req)

    def remove(self, req: Request) -> None:
        self._items.remove(req)

    def __iter__(self) -> Iterator[Request]:
        self._items.sort(key=self._key)
        return iter(list(self._items))

    def __len__(self) -> int:
        return len(self._items)


def make_waiting_queue(policy: str, key: RequestKey) -> WaitingQueue:
    if policy == "slo":
        return SlackQueue(key)
    return FCFSQueue() if policy == "fcfs" else SortedQueue(key)
