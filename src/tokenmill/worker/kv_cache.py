"""KV cache sizing and allocation: one tensor of flat slots, a view per layer."""

from __future__ import annotations

import math

import torch

from tokenmill.config import ModelConfig

DEFAULT_CPU_KV_GB = 1.0  # the KV budget where none is given and no GPU profiles its memory


def kv_bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.num_hidden_layers * block_size * cfg.num_key_value_heads * cfg.head_dim * elem


def num_blocks_for_budget(
    cfg: ModelConfig,
    block_size: int,
    dtype: torch.dtype,
    memory_gb: float,
    max_model_len: int,
    num_blocks: int | None = None,
) -> int:
    """Blocks that fit the budget; a clear error if one max-length request cannot fit."""
    per_block = kv_bytes_per_block(cfg, block_size, dtype)
    if num_blocks is None:
        num_blocks = int(memory_gb * 2**30 // per_block)
    needed = math.ceil(max_model_len / block_size)
    if num_blocks < needed:
        raise ValueError(
            f"the KV cache holds {num_blocks} blocks ({num_blocks * block_size} tokens, "
            f"{memory_gb:g} GiB at {per_block} bytes per block), but one request of "
            f"max_model_len={max_model_len} tokens needs {needed} blocks; raise "
            "kv_cache_memory_gb (--kv-cache-memory-gb) or lower max_model_len (--max-model-len)"
        )
    return num_blocks


def allocate_kv_cache(
    cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: str
) -> torch.Tensor:
    # [layers, 2 (k, v), num_blocks, block_size, H_kv, D]
    return torch.zeros(
        cfg.num_hidden_layers,
        2,
        num_blocks,
        block_size,
        cfg.num_key_value_heads,
        cfg.head_dim,
        dtype=dtype,
        device=device,
    )
