"""Validation of the engine's options: each bad value is a ValueError naming the option and
what it must be (the CLI and `LLM(...)` report it as given)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tokenmill.config import EngineConfig

# The attention backends by name (layers/attn_backends); "auto" picks by device.
ATTENTION_BACKENDS = ("auto", "cpu", "sdpa", "triton", "unified-ref")


def check_engine_config(config: EngineConfig) -> None:
    if config.block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {config.block_size}")
    if config.tensor_parallel_size < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {config.tensor_parallel_size}")
    if config.enable_expert_parallel and config.tensor_parallel_size < 2:
        raise ValueError(
            "enable_expert_parallel shares the experts out over tensor-parallel ranks: it "
            f"needs tensor_parallel_size >= 2, got {config.tensor_parallel_size}"
        )
    if config.expert_memory_gb is not None and config.tensor_parallel_size > 1:
        raise ValueError(
            "expert_memory_gb (expert offloading) is not supported with "
            f"tensor_parallel_size {config.tensor_parallel_size}; use one of the two"
        )
    if config.distributed_executor_backend not in ("mp", "ray"):
        raise ValueError(
            "distributed_executor_backend must be mp or ray, got "
            f"{config.distributed_executor_backend!r}"
        )
    if config.distributed_port is not None and not 0 < config.distributed_port < 65536:
        raise ValueError(f"distributed_port must be in 1..65535, got {config.distributed_port}")
    if config.max_model_len is not None and config.max_model_len < 1:
        raise ValueError(f"max_model_len must be >= 1, got {config.max_model_len}")
    if config.max_num_batched_tokens < 1:
        raise ValueError(
            f"max_num_batched_tokens must be >= 1, got {config.max_num_batched_tokens}"
        )
    if config.max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be >= 1, got {config.max_num_seqs}")
    if config.kv_cache_memory_gb is not None and config.kv_cache_memory_gb <= 0:
        raise ValueError(f"kv_cache_memory_gb must be > 0, got {config.kv_cache_memory_gb}")
    if config.expert_memory_gb is not None and config.expert_memory_gb <= 0:
        raise ValueError(f"expert_memory_gb must be > 0, got {config.expert_memory_gb}")
    if config.expert_cache_policy not in ("lru", "hobbit"):
        raise ValueError(
            f"expert_cache_policy must be lru or hobbit, got {config.expert_cache_policy!r}"
        )
    if config.expert_miss_precision not in (None, "int4", "int2"):
        raise ValueError(
            f"expert_miss_precision must be int4 or int2, got {config.expert_miss_precision!r}"
        )
    if config.expert_miss_precision is not None and config.expert_memory_gb is None:
        raise ValueError("expert_miss_precision needs expert_memory_gb (expert offloading)")
    if not 0.0 < config.expert_miss_threshold <= 1.0:
        raise ValueError(
            f"expert_miss_threshold must be in (0, 1], got {config.expert_miss_threshold}"
        )
    if config.cache_aware_max_waiting < 0:
        raise ValueError(
            f"cache_aware_max_waiting must be >= 0, got {config.cache_aware_max_waiting}"
        )
    if config.scheduling_policy not in ("fcfs", "priority", "slo"):
        raise ValueError(
            f"scheduling_policy must be fcfs, priority or slo, got {config.scheduling_policy!r}"
        )
    if config.speculative not in (None, "suffix", "ngram", "draft"):
        raise ValueError(f"speculative must be suffix, ngram or draft; got {config.speculative!r}")
    if config.speculative == "draft" and not config.speculative_model:
        raise ValueError("speculative='draft' needs speculative_model (a draft model path)")
    if not 0.0 <= config.speculative_draft_cost < 1.0:
        raise ValueError(
            f"speculative_draft_cost must be in [0, 1), got {config.speculative_draft_cost}"
        )
    if config.max_forced_tokens < 0:
        raise ValueError(f"max_forced_tokens must be >= 0, got {config.max_forced_tokens}")
    if config.num_speculative_tokens < 1:
        raise ValueError(
            f"num_speculative_tokens must be >= 1, got {config.num_speculative_tokens}"
        )
    if not 1 <= config.prompt_lookup_min <= config.prompt_lookup_max:
        raise ValueError(
            "need 1 <= prompt_lookup_min <= prompt_lookup_max, got "
            f"{config.prompt_lookup_min} and {config.prompt_lookup_max}"
        )
    if config.suffix_max_depth < 1 or config.suffix_max_cached_requests < 0:
        raise ValueError(
            "need suffix_max_depth >= 1 and suffix_max_cached_requests >= 0, got "
            f"{config.suffix_max_depth} and {config.suffix_max_cached_requests}"
        )
    if config.quantization not in (None, "none", "int8", "int4", "squeezellm"):
        raise ValueError(
            f"quantization must be none, int8, int4 or squeezellm (or unset: as the "
            f"checkpoint stores the weights); got {config.quantization!r}"
        )
    if not (config.device in ("auto", "cpu", "cuda") or config.device.startswith("cuda:")):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N; got {config.device!r}")
    if config.attention_backend not in ATTENTION_BACKENDS:
        raise ValueError(
            "attention_backend must be auto, cpu, sdpa, triton or unified-ref; got "
            f"{config.attention_backend!r}"
        )
    if not 0.0 < config.gpu_memory_utilization <= 1.0:
        raise ValueError(
            f"gpu_memory_utilization must be in (0, 1], got {config.gpu_memory_utilization}"
        )
    if config.dtype not in ("auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16"):
        raise ValueError(
            f"dtype must be one of auto, float32, bfloat16, float16; got {config.dtype!r}"
        )
