"""KV cache sizing and allocation: a tensor per KV cache group, a view per layer.

`size_kv_cache` is the one place that decides how many blocks a runner's cache gets, for the
engine's model and a draft model alike, counted in blocks of every layer. `plan_kv_groups` then
groups the layers by attention window and `split_kv_blocks` shares those bytes out: a
sliding-window group gets what its requests can hold at once (a window and a step each), a
global group the rest (core/kv_group.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from tokenmill.config import ModelConfig
from tokenmill.worker.gpu_memory import kv_blocks_from_free_memory

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


@dataclass(frozen=True)
class KVCacheBudget:
    """What a runner's KV cache may take. An exact `num_blocks` wins; else `memory_gb`; with
    neither, a GPU gets what a profiling forward leaves of `gpu_memory_utilization` of the card
    and a CPU DEFAULT_CPU_KV_GB. `max_blocks` caps the result (a draft model needs no more
    than its requests can fill)."""

    num_blocks: int | None = None
    memory_gb: float | None = None
    max_blocks: int | None = None
    gpu_memory_utilization: float = 0.9


def size_kv_cache(
    budget: KVCacheBudget,
    cfg: ModelConfig,
    block_size: int,
    dtype: torch.dtype,
    max_model_len: int,
    device: str,
    profile: Callable[[], None],
) -> int:
    """The number of KV blocks (a clear error when one max_model_len request does not fit).
    `profile` runs the largest step; it is called only to size a GPU cache from free memory."""
    if budget.num_blocks is None and budget.memory_gb is None and device.startswith("cuda"):
        num_blocks = kv_blocks_from_free_memory(
            profile,
            kv_bytes_per_block(cfg, block_size, dtype),
            block_size,
            max_model_len,
            budget.gpu_memory_utilization,
            torch.device(device),
        )
    else:
        num_blocks = num_blocks_for_budget(
            cfg,
            block_size,
            dtype,
            budget.memory_gb or DEFAULT_CPU_KV_GB,
            max_model_len,
            budget.num_blocks,
        )
    if budget.max_blocks is not None:
        num_blocks = min(num_blocks, max(budget.max_blocks, math.ceil(max_model_len / block_size)))
    return num_blocks


@dataclass(frozen=True)
class KVGroupLayout:
    """The attention layers (indices in model order) of one KV cache group and their window."""

    sliding_window: int | None
    layers: tuple[int, ...]


def plan_kv_groups(windows: Sequence[int | None], split: bool = True) -> list[KVGroupLayout]:
    """Groups attention layers by window: the global layers first, then each window from the
    smallest. `split=False`, or one window for all: a single group, windowed only when every
    layer shares the window (its blocks are then released), else kept whole."""
    distinct = set(windows)
    if not split or len(distinct) == 1:
        window = distinct.pop() if len(distinct) == 1 else None
        return [KVGroupLayout(window, tuple(range(len(windows))))]
    order = sorted(distinct, key=lambda w: -1 if w is None else w)
    return [KVGroupLayout(w, tuple(i for i, lw in enumerate(windows) if lw == w)) for w in order]


def split_kv_blocks(
    num_blocks: int,
    groups: Sequence[KVGroupLayout],
    block_size: int,
    max_num_seqs: int,
    max_step_tokens: int,
) -> list[int]:
    """Each group's block count from a budget of `num_blocks` blocks of every layer.

    A windowed group never needs more than its running requests hold at once: a window, one
    step's tokens and a partial block at each end for each of them. What it needs less than
    `num_blocks` goes to the global group (a block of fewer layers costs less, so it gets more
    of them). Without a global group every group keeps `num_blocks` (the rest would be idle)."""
    counts = [num_blocks] * len(groups)
    global_layers = sum(len(g.layers) for g in groups if g.sliding_window is None)
    if not global_layers:
        return counts
    spare_layer_blocks = 0
    for i, g in enumerate(groups):
        if g.sliding_window is not None:
            need = max_num_seqs * (math.ceil(g.sliding_window / block_size) + 2) + math.ceil(
                max_step_tokens / block_size
            )
            counts[i] = min(num_blocks, need)
            spare_layer_blocks += (num_blocks - counts[i]) * len(g.layers)
    extra = spare_layer_blocks // global_layers
    return [
        c + extra if g.sliding_window is None else c for c, g in zip(counts, groups, strict=True)
    ]


def allocate_kv_cache(
    cfg: ModelConfig,
    num_blocks: int,
    block_size: int,
    dtype: torch.dtype,
    device: str,
    num_layers: int | None = None,
) -> torch.Tensor:
    """[layers, 2 (k, v), num_blocks, block_size, H_kv, D]: every layer's, or `num_layers`'."""
    return torch.zeros(
        cfg.num_hidden_layers if num_layers is None else num_layers,
        2,
        num_blocks,
        block_size,
        cfg.num_key_value_heads,
        cfg.head_dim,
        dtype=dtype,
        device=device,
    )
