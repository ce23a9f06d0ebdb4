"""The contract between the scheduler and the model runner, and what the scheduler reports."""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenmill.core.kv_cache_manager import KVCacheStats
from tokenmill.core.spec_stats import SpecDecodeStats
from tokenmill.request import Request


@dataclass
class ScheduledSeq:
    """`len(token_ids)` tokens of one request to run this step, starting at position `start_pos`.

    `sample` is True when the chunk reaches the request's last known token, so the logits of the
    chunk's last position give its next token. Intermediate prompt chunks only fill the KV cache.

    Speculative decoding: the last `num_draft_tokens` of `token_ids` are unverified drafts (only
    when `sample`). The logits of the last `num_draft_tokens + 1` positions verify them; the
    runner returns the accepted drafts plus one token, and the KV of rejected drafts is dropped
    by rolling back `num_computed_tokens`.
    """

    req: Request
    token_ids: list[int]
    start_pos: int
    block_ids: tuple[list[int], ...]  # a block table per KV cache group
    sample: bool
    num_draft_tokens: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def draft_token_ids(self) -> list[int]:
        return self.token_ids[len(self.token_ids) - self.num_draft_tokens :]


@dataclass
class SchedulerOutput:
    seqs: list[ScheduledSeq]
    num_batched_tokens: int
    preempted_req_ids: list[str] = field(default_factory=list)
    # Requests that finished or were aborted since the previous schedule(): drop their state.
    finished_req_ids: list[str] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.seqs


@dataclass
class TopLogprobs:
    """Logprobs at one position: the chosen/actual token plus the top-k."""

    token_id: int
    logprob: float
    rank: int  # 1 = most likely
    top_ids: list[int]
    top_logprobs: list[float]


@dataclass
class ModelRunnerOutput:
    # req_id -> the token(s) sampled for it this step (only for seqs with sample=True): the
    # accepted drafts, then the one token the target model chose after them
    sampled_token_ids: dict[str, list[int]]
    # req_id -> logprobs of each sampled token (only when requested)
    logprobs: dict[str, list[TopLogprobs]] = field(default_factory=dict)
    # req_id -> logprobs of the prompt tokens this chunk predicts, in order (when requested)
    prompt_logprobs: dict[str, list[TopLogprobs]] = field(default_factory=dict)


@dataclass
class EngineCoreOutput:
    """What one step produced for one request, handed to the engine's detokenizer."""

    req: Request
    new_token_ids: list[int]
    new_logprobs: list[TopLogprobs] | None
    new_prompt_logprobs: list[TopLogprobs] | None
    finished: bool
    # new_prompt_logprobs[i] is for prompt token prompt_logprobs_start + 1 + i; a request that
    # was preempted mid-prompt recomputes positions it already reported.
    prompt_logprobs_start: int = 0


@dataclass(frozen=True)
class SchedulerStats:
    """A snapshot of the scheduler's counters (`Scheduler.stats()`)."""

    num_running: int
    num_waiting: int
    num_preemptions: int
    kv_cache: KVCacheStats
    spec_decode: SpecDecodeStats  # a copy: the scheduler keeps counting in its own
