"""KV cache sizing: one function for the engine's model and a draft model alike."""

from __future__ import annotations

import pytest
import torch

from tokenmill.config import ModelConfig
from tokenmill.worker.kv_cache import (
    DEFAULT_CPU_KV_GB,
    KVCacheBudget,
    kv_bytes_per_block,
    size_kv_cache,
)

CFG = ModelConfig.from_hf_dict(
    {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "vocab_size": 256,
        "max_position_embeddings": 256,
    }  # fmt: skip
)


def never() -> None:
    raise AssertionError("only a GPU without an explicit budget profiles")


def size(budget: KVCacheBudget, max_model_len: int = 64) -> int:
    return size_kv_cache(budget, CFG, 16, torch.float32, max_model_len, "cpu", profile=never)


def test_an_exact_count_a_memory_budget_or_the_cpu_default() -> None:
    per_block = kv_bytes_per_block(CFG, 16, torch.float32)
    assert per_block == 2 * 2 * 16 * 2 * 16 * 4  # k and v, layers, tokens, kv heads, D, fp32
    assert size(KVCacheBudget(num_blocks=10)) == 10
    assert size(KVCacheBudget(memory_gb=1 / 1024)) == 2**20 // per_block
    assert size(KVCacheBudget()) == int(DEFAULT_CPU_KV_GB * 2**30) // per_block


def test_a_cap_never_below_one_full_length_request() -> None:
    assert size(KVCacheBudget(num_blocks=100, max_blocks=12)) == 12
    assert size(KVCacheBudget(num_blocks=100, max_blocks=1), max_model_len=64) == 4


def test_too_small_for_one_request_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="max_model_len=64 tokens needs 4 blocks"):
        size(KVCacheBudget(num_blocks=3))
