"""How many sequences the async engine holds at once.

A request with n samples counts n sequences, running and waiting together. One that could never
fit, however long the client waits, is refused for good (CapacityError, a 400); one that only
has to wait for others to finish is told to retry later (QueueFullError, a 503).
"""

from __future__ import annotations

from tokenmill.errors import CapacityError


class QueueFullError(RuntimeError):
    """Too many requests are already waiting; the client should retry later."""


class SeqBudget:
    """The pending sequences against `limit` (None: unbounded). Event-loop side only."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.num_pending = 0

    def check_capacity(self, n: int, num_prompts: int = 1) -> None:
        """CapacityError when n samples of each of `num_prompts` prompts could never be pending
        at once, however long the client waits: retrying cannot help (unlike a full queue)."""
        limit = self.limit
        if limit is not None and n * num_prompts > limit:
            raise CapacityError(
                f"the request needs {n * num_prompts} sequences at once (n={n} x {num_prompts} "
                f"prompt(s)), but this server holds at most {limit} (running and queued "
                "together); lower n or send fewer prompts",
                "n",
            )

    def check_room(self, n: int, num_prompts: int = 1) -> None:
        """check_capacity, then QueueFullError unless that many sequences fit right now."""
        self.check_capacity(n, num_prompts)
        num_seqs = n * num_prompts
        limit = self.limit
        if limit is not None and self.num_pending + num_seqs > limit:
            raise QueueFullError(
                f"the server is at capacity ({self.num_pending} sequences pending, "
                f"limit {limit}; this request needs {num_seqs}); retry later"
            )

    def add(self, num_seqs: int) -> None:
        self.num_pending += num_seqs

    def remove(self, num_seqs: int) -> None:
        self.num_pending -= num_seqs
