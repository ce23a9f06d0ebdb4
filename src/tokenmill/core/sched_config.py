"""The scheduler's limits and policy, taken from the engine's configuration."""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenmill.config import EngineConfig
from tokenmill.core.kv_group import KVGroupSpec
from tokenmill.core.policy import POLICIES
from tokenmill.core.slo_knobs import SloKnobs


@dataclass(frozen=True)
class SchedulerConfig:
    """What the scheduler needs to know. The engine builds it with `from_engine_config`, from an
    EngineConfig that has validated every value already, so only invariants are asserted here."""

    max_num_batched_tokens: int
    max_num_seqs: int
    max_model_len: int
    block_size: int
    # The runner's KV cache groups: each one's block count and the window its layers share.
    kv_groups: tuple[KVGroupSpec, ...]
    enable_prefix_caching: bool = True
    policy: str = "fcfs"  # fcfs | priority (lower `priority` first, then arrival)
    # Longest cached prefix first while at most this many wait (0: policy order only); a request
    # passed over max_passed_over times goes first (see core/admission.py).
    cache_aware_max_waiting: int = 128
    max_passed_over: int = 8
    # Structured output: at most this many tokens a grammar forces (its mask allows one token
    # only) are appended per step without sampling; 0 turns forced runs off.
    max_forced_tokens: int = 0
    # The slo policy's constants (the simulator grids over them; see core/slo_knobs.py).
    slo_knobs: SloKnobs = field(default_factory=SloKnobs)

    def __post_init__(self) -> None:
        positive = (
            self.max_num_batched_tokens,
            self.max_num_seqs,
            self.max_model_len,
            self.block_size,
            self.max_passed_over,
        )
        assert min(positive) >= 1, self
        assert self.cache_aware_max_waiting >= 0, self
        assert self.max_forced_tokens >= 0, self
        assert self.policy in POLICIES, self
        assert self.kv_groups and all(isinstance(g, KVGroupSpec) for g in self.kv_groups), self

    @classmethod
    def from_engine_config(
        cls,
        config: EngineConfig,
        *,
        max_model_len: int,
        kv_groups: tuple[KVGroupSpec, ...],
    ) -> SchedulerConfig:
        """The scheduler's share of `config`, plus what loading the model decided: the context
        length and the KV cache's groups (block counts and windows)."""
        return cls(
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_num_seqs=config.max_num_seqs,
            max_model_len=max_model_len,
            block_size=config.block_size,
            kv_groups=kv_groups,
            enable_prefix_caching=config.enable_prefix_caching,
            policy=config.scheduling_policy,
            cache_aware_max_waiting=config.cache_aware_max_waiting,
            max_forced_tokens=config.max_forced_tokens,
        )
