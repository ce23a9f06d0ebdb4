"""KV cache sizing: one function for the engine's model and a draft model alike, then the
layers grouped by window and the budget shared out among the groups."""

from __future__ import annotations

import pytest
import torch

from tokenmill.config import ModelConfig
from tokenmill.worker.kv_cache import (
    DEFAULT_CPU_KV_GB,
    KVCacheBudget,
    KVGroupLayout,
    kv_bytes_per_block,
    plan_kv_groups,
    size_kv_cache,
    split_kv_blocks,
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


def test_layers_grouped_by_window_global_first() -> None:
    assert plan_kv_groups([None, None]) == [KVGroupLayout(None, (0, 1))]
    assert plan_kv_groups([8, 8, 8]) == [KVGroupLayout(8, (0, 1, 2))]  # all windowed alike
    gemma3 = [512] * 5 + [None] + [512] * 5 + [None]
    assert plan_kv_groups(gemma3) == [
        KVGroupLayout(None, (5, 11)),
        KVGroupLayout(512, (0, 1, 2, 3, 4, 6, 7, 8, 9, 10)),
    ]
    assert plan_kv_groups([64, None, 8]) == [
        KVGroupLayout(None, (1,)), KVGroupLayout(8, (2,)), KVGroupLayout(64, (0,))
    ]  # fmt: skip
    # one table for every layer: nothing released, as the global layers read every block
    assert plan_kv_groups(gemma3, split=False) == [KVGroupLayout(None, tuple(range(12)))]


def test_windowed_groups_get_what_their_requests_hold_and_the_global_group_the_rest() -> None:
    groups = plan_kv_groups([16, None, 16, 16])  # three windowed layers, one global
    # 4 requests x (16/4 window blocks + 2) + 8 step blocks = 32 windowed blocks
    assert split_kv_blocks(100, groups, 4, max_num_seqs=4, max_step_tokens=32) == [
        100 + (100 - 32) * 3,
        32,
    ]
    # the bytes stay the budget's: blocks x layers
    counts = split_kv_blocks(100, groups, 4, max_num_seqs=4, max_step_tokens=32)
    assert counts[0] * 1 + counts[1] * 3 == 100 * 4
    # a budget smaller than what the windowed layers could hold: an even split, as one group
    assert split_kv_blocks(20, groups, 4, max_num_seqs=4, max_step_tokens=32) == [20, 20]
    # nothing to give the spare blocks to without a global group
    assert split_kv_blocks(100, plan_kv_groups([16, 16]), 4, 4, 32) == [100]
