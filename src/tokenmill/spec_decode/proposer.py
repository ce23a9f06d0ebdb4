"""The proposer interface: draft tokens from token ids alone (no tensors, no text)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable

from tokenmill.request import Request


class Proposer(ABC):
    """Guesses the tokens that follow each request's current tokens.

    A request's tokens (prompt + output) only ever grow between calls, so a proposer may keep
    per-request state and ingest just the new tail; `finish` drops that state.
    """

    @abstractmethod
    def propose(self, reqs: list[Request], max_drafts: list[int]) -> list[list[int]]:
        """Draft ids per request, at most `max_drafts[i]` (>= 1) for request i; may be empty."""

    def finish(self, req_ids: Iterable[str]) -> None:  # noqa: B027 - optional hook
        """These requests are done (finished or aborted): drop their state."""
