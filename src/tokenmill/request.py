"""The engine's view of one sequence being generated. Pure Python: no tensors, no text."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Protocol

from tokenmill.sampling_params import SamplingParams


class GrammarState(Protocol):
    """A constrained request's grammar (see structured/), as the scheduler sees it.

    Invariant: the grammar has accepted exactly `output_token_ids` -- each token is accepted
    where it is appended, and a preempted request is recomputed without resampling them.
    """

    @property
    def ready(self) -> bool:
        """The grammar has compiled (or failed to): the request may be scheduled."""
        ...

    def accept_token(self, token_id: int) -> bool:
        """Advance by one sampled token; False when the grammar rejects it."""
        ...

    def is_terminated(self) -> bool:
        """The grammar accepted a stop token: the output is complete."""
        ...

    def valid_prefix(self, token_ids: list[int]) -> int:
        """How many leading `token_ids` (a draft) the grammar accepts in turn, stopping before
        one that would terminate it. Does not advance the grammar."""
        ...

    def forced_tokens(self, max_n: int) -> list[int]:
        """Up to `max_n` tokens that follow the accepted ones because the mask allows exactly
        one token at each of their positions. Does not advance the grammar: the caller accepts
        each token with `accept_token` as it appends it."""
        ...


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # lost its KV; waits to be recomputed
    FINISHED_STOPPED = "finished_stopped"
    FINISHED_LENGTH = "finished_length"
    FINISHED_ABORTED = "finished_aborted"

    @property
    def finished(self) -> bool:
        return self in _FINISHED

    @property
    def finish_reason(self) -> str | None:
        return {
            RequestStatus.FINISHED_STOPPED: "stop",
            RequestStatus.FINISHED_LENGTH: "length",
            RequestStatus.FINISHED_ABORTED: "abort",
        }.get(self)


_FINISHED = frozenset(s for s in RequestStatus if s.value.startswith("finished"))


@dataclass(eq=False)
class Request:
    """One sequence. `n > 1` prompts become n Requests that share a `parent_id`.

    Invariant: `num_computed_tokens <= num_tokens`; tokens in `[num_computed_tokens, num_tokens)`
    are the ones the scheduler still has to run through the model.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    max_tokens: int = 16  # resolved: never None here
    seed: int = 0  # resolved per sample: sampling is reproducible whatever the batch
    priority: int = 0  # lower runs first; ties by arrival
    arrival_time: float = field(default_factory=time.monotonic)
    parent_id: str | None = None  # the n>1 group; siblings wait for the first one's prompt
    sample_index: int = 0
    cache_salt: str | None = None
    grammar: GrammarState | None = None  # set for structured-output requests

    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    # Draft tokens a proposer guessed to follow output_token_ids; not part of num_tokens. The
    # scheduler runs them as extra query tokens of the next step and then clears them.
    spec_token_ids: list[int] = field(default_factory=list)
    num_drafted_tokens: int = 0  # draft tokens verified so far
    num_accepted_draft_tokens: int = 0  # of which accepted
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at first schedule
    status: RequestStatus = RequestStatus.WAITING
    num_preemptions: int = 0
    stop_reason: int | str | None = None
    slo_hopeless: bool = False  # slo policy: found unable to meet its targets (see core/urgency)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def token_slice(self, start: int, end: int) -> list[int]:
        p = len(self.prompt_token_ids)
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p : end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - p]

    @property
    def is_finished(self) -> bool:
        return self.status in _FINISHED
