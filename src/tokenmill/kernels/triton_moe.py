"""The fused mixture-of-experts matmul for CUDA: every active expert of a layer in one launch per
projection, its weights in bf16 / fp16 / fp32 or in quantized blocks (the layout of
`kernels.triton_quant`, stacked over the experts).

The rows arrive grouped by expert (`counts[e]` rows for expert e, in ascending e, as the MoE
layer's stable sort leaves them). The host cuts each expert's rows into tiles of BLOCK_M rows
(one expert a tile, so a tile never mixes weights) and passes, per tile, its expert, first row
and end row; the grid is (tiles, cdiv(N, BLOCK_N)). A program multiplies its rows by its
expert's [BLOCK_K, BLOCK_N] weight tiles, dequantized in registers for quantized experts exactly
as `quant_matmul` does (w = d * q + m in float32, rounded to x's dtype), accumulating tl.dot in
float32. An expert with no rows costs nothing: it has no tile.

Weights (`MoeWeights`), for E experts of an [N, K] projection:
  dense   w [E, N, K] in x's dtype (the layer's stacked parameter, as transformers stacks it);
  4 bits  qweight uint8 [E, N, K // 2], d, m fp16 [E, K // 32, N];
  8 bits  qweight uint8 [E, N, K], d, m as above.

Import this module only where triton is wanted; on CPU tensors it runs under Triton's
interpreter when TRITON_INTERPRET=1 was set before the import (tests).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from tokenmill.kernels.triton_quant import _dot, _q4_blocks  # shared with the dense kernel

BLOCK = 32  # weights per quantization block along K


@dataclass
class MoeWeights:
    """One projection of E experts, stacked (see the module docstring); bits 0 is dense."""

    w: torch.Tensor  # dense [E, N, K], or the quantized qweight
    d: torch.Tensor | None = None
    m: torch.Tensor | None = None
    bits: int = 0

    @property
    def shape(self) -> tuple[int, int, int]:
        """(E, N, K)."""
        e, n = self.w.shape[:2]
        return e, n, self.w.shape[2] * (2 if self.bits == 4 else 1)


@triton.jit
def _moe_matmul_kernel(
    x_ptr,  # [R, K], rows grouped by expert
    w_ptr,  # [E, N, K] dense, or uint8 [E, N, K // 2] / [E, N, K]
    d_ptr,  # fp16 [E, NB, N] (quantized) or a dummy
    m_ptr,  # fp16 [E, NB, N] (quantized) or a dummy
    y_ptr,  # [R, N]
    tile_expert_ptr,  # int32 [tiles]
    tile_start_ptr,  # int32 [tiles]: first row
    tile_end_ptr,  # int32 [tiles]: one past the expert's last row
    N,
    K,
    stride_xm,
    stride_ym,
    BITS: tl.constexpr,  # 0 dense, 4 or 8
    FP32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(tile_expert_ptr + pid_t).to(tl.int64)
    start = tl.load(tile_start_ptr + pid_t)
    end = tl.load(tile_end_ptr + pid_t)
    offs_m = start + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < end
    n_ok = offs_n < N
    offs_n64 = offs_n.to(tl.int64)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm  # [BM, 1]
    x_dtype = x_ptr.dtype.element_ty
    NB = K // 32
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)  # a builtin: see triton_quant
    if BITS == 4:
        w_cols = w_ptr + e * N * (NB * 16) + offs_n64[None, :] * (NB * 16)  # [1, BN]
        s_base = e * NB * N + offs_n64[None, :]
        d_cols, m_cols = d_ptr + s_base, m_ptr + s_base
        for kb in range(0, NB, BLOCK_K // 32):
            acc = _q4_blocks(
                acc, x_rows, 1, w_cols, d_cols, m_cols, N, kb, NB, m_ok, n_ok, FP32_DOT, BLOCK_K
            )
    else:
        w_cols = w_ptr + e * N * K + offs_n64[None, :] * K  # [1, BN]
        s_base = e * NB * N
        offs_k = tl.arange(0, BLOCK_K)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + offs_k
            k_ok = k < K
            xt = tl.load(x_rows + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            wmask = k_ok[:, None] & n_ok[None, :]
            if BITS == 8:
                q = tl.load(w_cols + k[:, None], mask=wmask, other=0)  # [BK, BN]
                s_off = s_base + (k // 32).to(tl.int64)[:, None] * N + offs_n64[None, :]
                d = tl.load(d_ptr + s_off, mask=wmask, other=0.0).to(tl.float32)
                mo = tl.load(m_ptr + s_off, mask=wmask, other=0.0).to(tl.float32)
                w = (q.to(tl.float32) * d + mo).to(x_dtype)
            else:
                w = tl.load(w_cols + k[:, None], mask=wmask, other=0.0).to(x_dtype)
            acc = _dot(xt, w, acc, FP32_DOT)
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def tiles(counts: list[int], block_m: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(expert, first row, end row) of every BLOCK_M-row tile of every active expert, int32."""
    experts, starts, ends = [], [], []
    row = 0
    for e, n in enumerate(counts):
        for s in range(row, row + n, block_m):
            experts.append(e)
            starts.append(s)
            ends.append(row + n)
        row += n
    t = torch.tensor([experts, starts, ends], dtype=torch.int32).to(device, non_blocking=True)
    return t[0], t[1], t[2]


def pick_block_m(counts: list[int]) -> int:
    """16 rows (tl.dot's minimum) while experts get a few rows each (decode), 64 above."""
    return 16 if max(counts) <= 32 else 64


def moe_matmul(x: torch.Tensor, w: MoeWeights, counts: list[int]) -> torch.Tensor:
    """y [R, N]: the counts[e] rows of x [R, K] that follow expert e - 1's, times expert e's
    weight^T, for every expert, in one launch; y in x's dtype."""
    num_experts, n, k = w.shape
    rows = x.shape[0]
    if len(counts) != num_experts or sum(counts) != rows or x.shape[1] != k or k % BLOCK:
        raise ValueError(
            f"x {tuple(x.shape)} with counts over {len(counts)} experts for {num_experts} "
            f"experts of [{n}, {k}] (K a multiple of {BLOCK})"
        )
    x = x.contiguous()
    y = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    if rows == 0:
        return y
    block_m = pick_block_m(counts)
    tile_expert, tile_start, tile_end = tiles(counts, block_m, x.device)
    block_n = 64
    block_k = 64 if x.dtype != torch.float32 else 32
    grid = (tile_expert.numel(), triton.cdiv(n, block_n))
    _moe_matmul_kernel[grid](
        x,
        w.w,
        w.d if w.d is not None else x,  # never read when dense
        w.m if w.m is not None else x,
        y,
        tile_expert,
        tile_start,
        tile_end,
        n,
        k,
        x.stride(0),
        y.stride(0),
        BITS=w.bits,
        FP32_DOT=x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and interpreted()),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=4,
        num_stages=3,
    )
    return y


def interpreted() -> bool:
    """Whether the kernel runs under Triton's interpreter (TRITON_INTERPRET=1 at import)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_moe_matmul_kernel, InterpretedFunction)
