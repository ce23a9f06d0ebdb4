"""The C++ row-independent dense matmul (csrc/dense_linear.cpp), JIT-built on first use.

Each output element is accumulated in one fixed order over K whatever the row count, so a row
is bit-identical alone and in any batch: batch-invariant mode's dense matmul where oneDNN
cannot serve it cheaply (see `quant.unquantized`).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

from tokenmill.kernels.cpp_build import cpu_flags, load_extension

EXT_NAME = "tokenmill_cpu_dense"


@functools.cache
def load_cpu_dense() -> Any | None:
    """`torch.ops.tokenmill_cpu_dense`, or None where it cannot be had (it needs AVX-512)."""
    if not {"avx512f", "avx512bw"} <= cpu_flags():
        return None
    return load_extension(EXT_NAME, "dense_linear.cpp", "dense_linear", "dense CPU matmul")


@functools.cache
def onednn_uses_amx() -> bool:
    """Whether oneDNN's bfloat16 matmul runs on AMX here (the CPU has AMX-BF16 and
    ONEDNN_MAX_CPU_ISA does not cap it). There it is several times faster than any AVX-512
    kernel once a matmul has tens of rows; elsewhere it runs the same vdpbf16ps as ours."""
    if not {"amx_bf16", "amx_tile"} <= cpu_flags():
        return False
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").upper()
    return cap in ("", "ALL", "DEFAULT") or "AMX" in cap


def dense_supported(dtype: torch.dtype) -> bool:
    """Whether the kernel takes weights of `dtype` here (bfloat16 needs AVX512-BF16)."""
    ops = load_cpu_dense()
    name = str(dtype).removeprefix("torch.")
    return ops is not None and bool(ops.dense_supports(name))


def pack_dense(w: torch.Tensor) -> torch.Tensor:
    """`w` [N, K] in the kernel's tiles of 16 output columns (see csrc/dense_linear.cpp)."""
    ops = load_cpu_dense()
    if ops is None:
        raise RuntimeError(f"{EXT_NAME} is unavailable")
    return ops.pack_dense.default(w.contiguous())


def dense_linear(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, n: int
) -> torch.Tensor:
    """y [M, n] = x [M, K] @ W^T (+ bias) for W packed by `pack_dense`; x has W's dtype."""
    ops = load_cpu_dense()
    if ops is None:
        raise RuntimeError(f"{EXT_NAME} is unavailable")
    return ops.dense_linear.default(x.contiguous(), packed, bias, n)
