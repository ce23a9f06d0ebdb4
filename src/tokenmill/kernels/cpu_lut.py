"""The C++ SqueezeLLM matmul (csrc/squeezellm.cpp): y = x W^T for W = lut[r, code] + a sparse
CSR matrix, read straight from the codes; JIT-built on first use (see cpp_build)."""

from __future__ import annotations

import functools
from typing import Any

import torch

from tokenmill.kernels.cpp_build import load_extension

EXT_NAME = "tokenmill_cpu_lut"
LUT_SLOTS = 16  # one zmm of float32: the kernel's table always has 16 entries


@functools.cache
def load_cpu_lut() -> Any | None:
    """`torch.ops.tokenmill_cpu_lut`, or None (with one warning) where it cannot be built."""
    return load_extension(EXT_NAME, "squeezellm.cpp", "lut_linear", "SqueezeLLM CPU kernel")


def lut_linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    lut16: torch.Tensor,
    crow: torch.Tensor,
    col: torch.Tensor,
    val: torch.Tensor,
) -> torch.Tensor:
    """y [M, R] = x [M, C] @ W^T for W = lut16[r, code] + CSR; lut16 float32 [R, 16]; x float32
    or bfloat16 (y has x's dtype, computed in float32)."""
    ops = load_cpu_lut()
    if ops is None:
        raise RuntimeError(f"{EXT_NAME} is unavailable")
    return ops.lut_linear.default(x.contiguous(), codes, lut16, crow, col, val)


def lut_dequantize(
    codes: torch.Tensor,
    lut16: torch.Tensor,
    crow: torch.Tensor,
    col: torch.Tensor,
    val: torch.Tensor,
    cols: int,
) -> torch.Tensor:
    """The bfloat16 weight [R, cols], bit-exact with `SqueezeLLMWeights.dequantize().bfloat16()`."""
    ops = load_cpu_lut()
    if ops is None:
        raise RuntimeError(f"{EXT_NAME} is unavailable")
    return ops.lut_dequantize.default(codes, lut16, crow, col, val, cols)


def kernel_lut(lut: torch.Tensor) -> torch.Tensor:
    """fp16 [R, 2^bits] -> float32 [R, 16] (3-bit tables padded with zeros, never indexed)."""
    out = torch.zeros(lut.shape[0], LUT_SLOTS, dtype=torch.float32)
    out[:, : lut.shape[1]] = lut.float()
    return out
