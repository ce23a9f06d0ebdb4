"""Sizes the GPU's KV cache from what a profiling forward leaves free.

The weights are loaded first; then one forward of the largest step the scheduler can make
(max_num_batched_tokens prompt tokens, plus logits for max_num_seqs rows) shows the activation
peak. The KV cache gets utilization * total memory, minus that peak (weights included), minus
what other processes and non-PyTorch allocations (CUDA context, cuBLAS workspaces) hold.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch

logger = logging.getLogger(__name__)

# Kept back for the CUDA graphs' memory pool and allocator fragmentation.
_GRAPH_RESERVE_BYTES = 256 * 2**20


def kv_blocks_from_free_memory(
    profile: Callable[[], None],
    per_block: int,
    block_size: int,
    max_model_len: int,
    utilization: float,
    device: torch.device,
) -> int:
    """Runs `profile` (the peak step) and returns how many KV blocks of `per_block` bytes fit;
    a clear error when not even one max-length request does."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    profile()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)  # weights + activations
    free, total = torch.cuda.mem_get_info(device)
    non_torch = (total - free) - torch.cuda.memory_reserved(device)
    budget = int(total * utilization) - peak - max(non_torch, 0) - _GRAPH_RESERVE_BYTES
    num_blocks = max(budget, 0) // per_block
    needed = math.ceil(max_model_len / block_size)
    gib = 2**30
    logger.info(
        "GPU memory: %.2f GiB total, weights + peak activations %.2f GiB, other %.2f GiB -> "
        "KV cache %.2f GiB (%d blocks)",
        total / gib, peak / gib, non_torch / gib, num_blocks * per_block / gib, num_blocks,
    )  # fmt: skip
    if num_blocks < needed:
        raise ValueError(
            f"the GPU has room for {num_blocks} KV blocks ({max(budget, 0) / gib:.2f} GiB left of "
            f"{total / gib:.1f} GiB at gpu_memory_utilization={utilization:g} after "
            f"{peak / gib:.2f} GiB of weights and activations), but one request of "
            f"max_model_len={max_model_len} tokens needs {needed}; raise "
            "--gpu-memory-utilization, lower --max-model-len or --max-num-batched-tokens, or "
            "use a smaller model or a quantized one"
        )
    return num_blocks
