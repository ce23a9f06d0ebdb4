"""Engine and request statistics: snapshots taken on the engine thread for /metrics and logs."""

from __future__ import annotations

from dataclasses import dataclass

from tokenmill.core.sched_types import SchedulerStats
from tokenmill.layers.expert_cache import ExpertCacheStats
from tokenmill.outputs import RequestOutput
from tokenmill.slo_params import SloParams


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the scheduler's state, taken on the engine thread after each iteration."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0  # fraction of KV blocks in use
    num_used_blocks: int = 0
    num_total_blocks: int = 0
    num_preemptions: int = 0
    num_steps: int = 0
    # Prefix cache, counted by the KV cache manager: prompt tokens looked up at admission, and
    # of those, tokens served from the cache.
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    # Speculative decoding (see core/spec_stats.py): a decode step is one request generating in
    # one step; it yields 1 + accepted tokens.
    spec_drafted_tokens: int = 0
    spec_accepted_tokens: int = 0
    spec_decode_steps: int = 0
    spec_decode_tokens: int = 0
    # MoE expert offloading (layers/expert_cache.py); zeros without it. A hit or miss is one
    # active expert of one layer in one forward pass; tokens are rows through the MoE layers.
    expert_offloading: bool = False
    expert_cache_hits: int = 0
    expert_cache_misses: int = 0
    expert_low_precision_hits: int = 0  # misses served from a low-bit copy (not loaded)
    expert_bytes_loaded: int = 0
    expert_tokens: int = 0
    expert_prefetches: int = 0
    expert_prefetch_predicted: int = 0
    expert_prefetch_correct: int = 0
    expert_prefetch_actual: int = 0


@dataclass(frozen=True)
class RequestStats:
    """Timings of one finished (or aborted) request, in seconds."""

    request_id: str
    finish_reasons: tuple[str, ...]
    num_prompt_tokens: int
    num_generation_tokens: int
    e2e_latency: float
    time_to_first_token: float | None
    time_per_output_token: float | None
    slo: SloParams | None = None
    slo_hopeless: bool = False  # the slo policy found it could not meet its targets


class StatsListener:
    """Hooks the engine thread calls; implementations must be thread-safe (prometheus is)."""

    def on_tokens(self, num_prompt_tokens: int, num_generation_tokens: int) -> None:
        """Prompt tokens of newly added requests and newly generated tokens."""

    def on_first_token(self, ttft: float) -> None:
        """A request produced its first token, `ttft` seconds after it arrived."""

    def on_finished(self, stats: RequestStats) -> None:
        """A request finished (stop, length or abort)."""

    def on_slo_rejected(self) -> None:
        """A request was refused because it could not meet its SLO (--slo-reject-hopeless)."""


@dataclass
class RequestTiming:
    """What the engine thread tracks of a live request for its timings."""

    arrival: float
    num_prompt_tokens: int
    first_token: float | None = None
    num_generated: int = 0
    slo: SloParams | None = None


def request_stats(out: RequestOutput, timing: RequestTiming, now: float) -> RequestStats:
    """The finished request's timings, `now` being its end."""
    ttft = None if timing.first_token is None else timing.first_token - timing.arrival
    longest = max((len(c.token_ids) for c in out.outputs), default=0)
    tpot = None
    if timing.first_token is not None and longest > 1:
        tpot = (now - timing.first_token) / (longest - 1)
    return RequestStats(
        request_id=out.request_id,
        finish_reasons=tuple(c.finish_reason or "abort" for c in out.outputs),
        num_prompt_tokens=timing.num_prompt_tokens,
        num_generation_tokens=timing.num_generated,
        e2e_latency=now - timing.arrival,
        time_to_first_token=ttft,
        time_per_output_token=tpot,
        slo=timing.slo,
        slo_hopeless=bool(out.slo and out.slo.get("hopeless")),
    )


def engine_stats(
    sched: SchedulerStats, num_steps: int, experts: ExpertCacheStats | None = None
) -> EngineStats:
    """The engine's snapshot from the scheduler's (`LLMEngine.scheduler_stats()`) and the
    expert cache's (`LLMEngine.expert_cache_stats()`, None without offloading)."""
    kv = sched.kv_cache
    spec = sched.spec_decode
    ex = experts or ExpertCacheStats()
    return EngineStats(
        num_running=sched.num_running,
        num_waiting=sched.num_waiting,
        kv_cache_usage=kv.usage,
        num_used_blocks=kv.num_used_blocks,
        num_total_blocks=kv.num_total_blocks,
        num_preemptions=sched.num_preemptions,
        num_steps=num_steps,
        prefix_cache_queries=kv.prefix_queries,
        prefix_cache_hits=kv.prefix_hits,
        spec_drafted_tokens=spec.num_drafted_tokens,
        spec_accepted_tokens=spec.num_accepted_tokens,
        spec_decode_steps=spec.num_decode_steps,
        spec_decode_tokens=spec.num_decode_tokens,
        expert_offloading=experts is not None,
        expert_cache_hits=ex.hits,
        expert_cache_misses=ex.misses,
        expert_low_precision_hits=ex.low_precision_hits,
        expert_bytes_loaded=ex.bytes_loaded,
        expert_tokens=ex.tokens,
        expert_prefetches=ex.prefetches,
        expert_prefetch_predicted=ex.prefetch_predicted,
        expert_prefetch_correct=ex.prefetch_correct,
        expert_prefetch_actual=ex.prefetch_actual,
    )
