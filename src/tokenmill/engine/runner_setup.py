"""Builds the engine's model runner from its config, in the engine's process and in every
tensor-parallel worker alike (so all ranks build the same runner)."""

from __future__ import annotations

from tokenmill.config import EngineConfig
from tokenmill.layers.expert_lowbit import MISS_PRECISIONS
from tokenmill.layers.tensor_parallel import TPGroup
from tokenmill.loader.model_loader import LoadedModel
from tokenmill.worker.kv_cache import KVCacheBudget
from tokenmill.worker.model_runner import ExpertOffload, GpuOptions, ModelRunner


def make_runner(
    config: EngineConfig,
    loaded: LoadedModel,
    *,
    cls: type[ModelRunner] = ModelRunner,
    tp: TPGroup | None = None,
) -> ModelRunner:
    return cls(
        loaded.model_config,
        loaded.weights,
        dtype=loaded.dtype,
        max_model_len=loaded.max_model_len,
        kv_budget=KVCacheBudget(
            num_blocks=config.num_kv_blocks,
            memory_gb=config.kv_cache_memory_gb,
            gpu_memory_utilization=config.gpu_memory_utilization,
        ),
        block_size=config.block_size,
        device=config.device,
        quant=loaded.quant,
        batch_invariant=config.batch_invariant,
        attention_backend=config.attention_backend,
        gpu=GpuOptions(
            enforce_eager=config.enforce_eager,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
        ),
        split_kv_groups=config.hybrid_kv_cache,
        experts=None
        if config.expert_memory_gb is None
        else ExpertOffload(
            config.expert_memory_gb,
            config.expert_cache_policy,
            config.expert_prefetch,
            MISS_PRECISIONS.get(config.expert_miss_precision or ""),
            config.expert_miss_threshold,
        ),
        tp=tp,
    )
