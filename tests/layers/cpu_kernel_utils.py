"""Inputs for the C++ CPU kernels' tests: a paged KV cache with shuffled block tables, and random
weights quantized into GGUF blocks by the gguf package."""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants

from tokenmill.quant.packing import QuantizedTensor


def make_case(
    lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    seed: int = 0,
    num_layers: int = 3,
    layer: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random q and a [L, 2, num_blocks, block_size, H_kv, D] cache with shuffled block tables;
    k_cache, v_cache are the per-layer views kv[layer, 0], kv[layer, 1] into it."""
    g = torch.Generator().manual_seed(seed)
    per_row = [-(-n // block_size) for n in lens]
    max_blocks = max(per_row) + 1  # one spare column of padding
    num_blocks = sum(per_row) + 3
    kv = torch.randn(num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim, generator=g)
    kv = kv.to(dtype)
    perm = torch.randperm(num_blocks, generator=g)
    tables = torch.zeros(len(lens), max_blocks, dtype=torch.int64)
    start = 0
    for b, n in enumerate(per_row):
        tables[b, :n] = perm[start : start + n]
        start += n
    q = torch.randn(len(lens), num_heads, head_dim, generator=g).to(dtype)
    return q, kv[layer, 0], kv[layer, 1], tables, torch.tensor(lens, dtype=torch.int64)


def gguf_tensor(
    qtype: str, rows: int, cols: int, seed: int = 0
) -> tuple[QuantizedTensor, np.ndarray]:
    """Random weights quantized by the gguf package; returns ours and gguf's dequantization."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((rows, cols)) * rng.uniform(0.01, 3.0, (rows, 1))).astype(np.float32)
    w[0, :32] = 0.0  # an all-zero block (scale 0)
    kind = GGMLQuantizationType[qtype]
    raw = gguf_quants.quantize(w, kind)  # uint8 [rows, bytes]
    ref = gguf_quants.dequantize(raw, kind).reshape(rows, cols)
    return QuantizedTensor(qtype, torch.from_numpy(raw.copy()), (rows, cols)), ref
