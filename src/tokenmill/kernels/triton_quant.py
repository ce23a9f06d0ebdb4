"""Block-quantized weights on the GPU: a layout and a Triton matmul that dequantizes in registers.

The weights are a `BlockWeights` (w = d * q + m per row and block of 32 along K, in float32)
repacked by `quant.gpu_layout.pack_for_gpu` into a `GpuQuantWeight`:

  qweight  uint8 [N, K // 2] for 4 bits: byte 16 b + i of a row holds block b's weight i in
           its low nibble and weight i + 16 in its high nibble (GGUF's own order), so a tile
           unpacks with one `& 0xF` and one `>> 4` and no shuffles: the low nibbles of a tile
           multiply x's columns 32 b + i, the high nibbles x's columns 32 b + 16 + i, as two
           tl.dot calls of half the depth. 8 bits: uint8 [N, K], one weight per byte.
  d, m     fp16 [K // 32, N], transposed so that one block's scales for BLOCK_N neighbouring
           rows are contiguous (a tile's scale loads coalesce across N).

The kernel never forms the dense weight in memory: each program loads a [BLOCK_K, BLOCK_N] tile
of q and its scales, dequantizes it in float32, rounds it to x's dtype (what dequantize-then-
F.linear in that dtype would multiply) and accumulates tl.dot in float32. K is always a multiple
of 32; N and M need not be multiples of their tiles (masked). The launch allocates only the
output and reads only shapes on the host, so it can be captured in a CUDA graph.

Import this module only where triton is wanted; on CPU tensors it runs under Triton's
interpreter when TRITON_INTERPRET=1 was set before the import (tests, `bench_quant_matmul`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

if TYPE_CHECKING:
    from tokenmill.quant.gpu_layout import GpuQuantWeight

BLOCK = 32  # weights per quantization block along K (the packing's block)


@dataclass(frozen=True)
class QuantMatmulConfig:
    block_m: int
    block_n: int
    block_k: int  # a power of two >= 32 (whole blocks of 32 per step)
    num_warps: int = 4
    num_stages: int = 3


# Nominal SM count where no GPU is present (an H100 SXM has 132); only steers tile choice.
_NOMINAL_SMS = 132


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return _NOMINAL_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def pick_config(
    m: int,
    n: int,
    k: int,
    dtype: torch.dtype,
    device: torch.device,
    batch_invariant: bool = False,
) -> QuantMatmulConfig:
    """Tile sizes by row count (no autotuning; no timing has chosen these yet).

    Decode (m <= 16, and always in batch-invariant mode so that a row's reduction order never
    depends on the batch): one 16-row tile (tl.dot's minimum) and no split-K. Reading the weight
    dominates, so BLOCK_N is the widest that still gives >= one program per SM (Llama-3.2-1B's
    N = 2048 gets 16 on an H100), BLOCK_K 256 (128 at BLOCK_N 64), loads pipelined 3 deep.
    Medium m: 64 x 64 tiles. Prefill (m >= 256): 128 x 128 x 32, 8 warps, 4 stages;
    each weight tile is dequantized cdiv(m, 128) times instead of once into a dense copy (work
    expected to hide behind the tensor cores, unmeasured) and no dense weight is allocated;
    `benchmarks/gpu_quant.py` times dequantize-then-cuBLAS to check that.

    fp32 x (exact IEEE dots, a correctness mode rather than a fast one): one small tile for
    every m, since the larger ones spill hundreds of bytes and need up to 180 KiB of shared
    memory (more than an A100 has).

    Compiled offline for sm_90 and sm_80 with triton 3.9's ptxas (16-divisible shapes, as
    launches specialize them), 4 and 8 bits, fp16 / bf16 / fp32: every config here pipelines
    its loads (cp.async) and none spills: 96-156 registers a thread on sm_90 (fp32 168), up
    to 187 on sm_80 (fp32 239); `benchmarks/gpu_quant.py --static` reproduces this. The
    transposed scale layout needed fewer registers than a row-major [N, K // 32] one in most.
    """
    k_cap = max(32, triton.next_power_of_2(k))  # no deeper than K itself (small test shapes)
    if dtype == torch.float32:
        return QuantMatmulConfig(16, 32, min(64, k_cap), 4, 2)
    if m <= 16 or batch_invariant:
        sms = _num_sms(device)
        if triton.cdiv(n, 64) >= sms:
            return QuantMatmulConfig(16, 64, min(128, k_cap), 4, 3)
        block_n = 32 if triton.cdiv(n, 32) >= sms else 16
        return QuantMatmulConfig(16, block_n, min(256, k_cap), 4, 3)
    if m < 256:
        return QuantMatmulConfig(64, 64, min(64, k_cap), 4, 3)
    return QuantMatmulConfig(128, 128, 32, 8, 4)


@triton.jit
def _dot(a, b, acc, FP32_DOT: tl.constexpr):
    """acc + a @ b, products exact and summed in float32. FP32_DOT: in IEEE float32 (no TF32),
    for fp32 x, and for bf16 x under the interpreter, whose tl.dot multiplies bf16 tiles as the
    raw uint16 they are stored in (triton 3.9); bf16 -> fp32 is exact, so the result matches
    the GPU's bf16 MMA up to summation order."""
    if FP32_DOT:  # one return statement: early returns are not portable across triton versions
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _q4_blocks(
    acc,
    x_rows,
    stride_xk,
    w_cols,
    d_cols,
    m_cols,
    N,
    kb,
    NB,
    m_ok,
    n_ok,
    FP32_DOT: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """acc + the products of BLOCK_K // 32 4-bit blocks from block kb on: x_rows [BM, 1] row
    pointers (column stride stride_xk), w_cols [1, BN] the output columns' packed rows (16 bytes
    a block: byte j holds column j in its low nibble, j + 16 in its high one), d_cols / m_cols
    [1, BN] the columns' scales and minimums at block 0 ([NB, N] each, fp16); w = q * d + m."""
    offs_h = tl.arange(0, BLOCK_K // 2)  # byte within the tile
    blk = kb + offs_h // 16  # [BK/2] block of each byte
    k_ok = blk < NB
    k_lo = blk * 32 + offs_h % 16  # x column of the low nibble; the high one is k_lo + 16
    xmask = m_ok[:, None] & k_ok[None, :]
    x_lo = tl.load(x_rows + k_lo[None, :] * stride_xk, mask=xmask, other=0.0)
    x_hi = tl.load(x_rows + (k_lo + 16)[None, :] * stride_xk, mask=xmask, other=0.0)
    wmask = k_ok[:, None] & n_ok[None, :]
    p = tl.load(w_cols + (kb * 16 + offs_h)[:, None], mask=wmask, other=0)  # [BK/2, BN]
    # scales gathered per byte (16 bytes share a block's): repeats hit L1
    s_off = blk.to(tl.int64)[:, None] * N
    d = tl.load(d_cols + s_off, mask=wmask, other=0.0).to(tl.float32)
    mo = tl.load(m_cols + s_off, mask=wmask, other=0.0).to(tl.float32)
    # masked lanes: q = d = m = 0, so w = 0 and x = 0 there
    x_dtype = x_lo.dtype
    w_lo = ((p & 0xF).to(tl.float32) * d + mo).to(x_dtype)
    w_hi = ((p >> 4).to(tl.float32) * d + mo).to(x_dtype)
    acc = _dot(x_lo, w_lo, acc, FP32_DOT)
    acc = _dot(x_hi, w_hi, acc, FP32_DOT)
    return acc


@triton.jit
def _quant_matmul_kernel(
    x_ptr,  # [M, K] fp16 / bf16 / fp32
    w_ptr,  # uint8 [N, K // 2] or [N, K]
    d_ptr,  # fp16 [NB, N]
    m_ptr,  # fp16 [NB, N]
    bias_ptr,  # [N] or a dummy
    y_ptr,  # [M, N], row stride stride_ym, x's dtype
    M,
    N,
    NB,  # K // 32
    stride_xm,
    stride_xk,
    stride_ym,
    BITS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    FP32_DOT: tl.constexpr,  # see _dot
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # axis 0 (M) varies fastest: programs launched together share a weight tile (read from DRAM
    # once, then from L2)
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm  # [BM, 1]
    offs_n64 = offs_n.to(tl.int64)
    x_dtype = x_ptr.dtype.element_ty
    # tl.full, not tl.zeros: a builtin, so the interpreter runs it even when triton.language was
    # imported before TRITON_INTERPRET was set (its @jit helpers then stay compiled-only)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    if BITS == 4:
        w_cols = w_ptr + offs_n64[None, :] * (NB * 16)  # [1, BN]
        d_cols, m_cols = d_ptr + offs_n64[None, :], m_ptr + offs_n64[None, :]
        for kb in range(0, NB, BLOCK_K // 32):
            acc = _q4_blocks(
                acc,
                x_rows,
                stride_xk,
                w_cols,
                d_cols,
                m_cols,
                N,
                kb,
                NB,
                m_ok,
                n_ok,
                FP32_DOT,
                BLOCK_K,
            )
    else:
        row_bytes = NB * 32
        w_cols = w_ptr + offs_n64[None, :] * row_bytes
        offs_k = tl.arange(0, BLOCK_K)
        for kb in range(0, NB, BLOCK_K // 32):
            blk = kb + offs_k // 32
            k_ok = blk < NB
            k = kb * 32 + offs_k
            xt = tl.load(
                x_rows + k[None, :] * stride_xk, mask=m_ok[:, None] & k_ok[None, :], other=0.0
            )
            wmask = k_ok[:, None] & n_ok[None, :]
            q = tl.load(w_cols + k[:, None], mask=wmask, other=0)  # [BK, BN]
            s_off = blk.to(tl.int64)[:, None] * N + offs_n64[None, :]
            d = tl.load(d_ptr + s_off, mask=wmask, other=0.0).to(tl.float32)
            mo = tl.load(m_ptr + s_off, mask=wmask, other=0.0).to(tl.float32)
            w = (q.to(tl.float32) * d + mo).to(x_dtype)
            acc = _dot(xt, w, acc, FP32_DOT)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def quant_matmul(
    x: torch.Tensor,
    w: GpuQuantWeight,
    bias: torch.Tensor | None = None,
    *,
    batch_invariant: bool = False,
    config: QuantMatmulConfig | None = None,
) -> torch.Tensor:
    """y [..., N] = x [..., K] @ W^T (+ bias), in x's dtype (fp16 / bf16; fp32 with an exact
    fp32 dot). `config` overrides `pick_config` (for sweeps); batch_invariant fixes the tiles."""
    n, k = w.shape
    if x.shape[-1] != k or x.dtype not in _DTYPES or x.device != w.device:
        raise ValueError(
            f"x {tuple(x.shape)} {x.dtype} on {x.device} for a [{n}, {k}] weight on {w.device}"
        )
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)  # [M, K], any strides
    rows = x2.shape[0]
    y = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    if rows == 0:
        return y.reshape(*lead, n)
    cfg = config or pick_config(rows, n, k, x.dtype, x.device, batch_invariant)
    if bias is not None:
        bias = bias.contiguous()
    grid = (triton.cdiv(rows, cfg.block_m), triton.cdiv(n, cfg.block_n))
    _quant_matmul_kernel[grid](
        x2,
        w.qweight,
        w.d,
        w.m,
        bias if bias is not None else y,  # never read without HAS_BIAS
        y,
        rows,
        n,
        k // BLOCK,
        x2.stride(0),
        x2.stride(1),
        y.stride(0),
        BITS=w.bits,
        HAS_BIAS=bias is not None,
        FP32_DOT=x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and interpreted()),
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return y.reshape(*lead, n)


def interpreted() -> bool:
    """Whether the kernel runs under Triton's interpreter (TRITON_INTERPRET=1 at import)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_quant_matmul_kernel, InterpretedFunction)
