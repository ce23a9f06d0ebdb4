"""Fused bfloat16 CPU ops of the decoder layer (csrc/fused_ops.cpp): residual add + RMSNorm,
RoPE + KV-cache write, SwiGLU. Each replaces a dozen small aten ops whose dispatch, not their
arithmetic, dominates a decode step; they round exactly where the PyTorch code does.

`fused_ops(x)` gives the op namespace when `x` can take them (a bfloat16 CPU tensor and the
extension built), else None and the caller runs its PyTorch code.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch

from tokenmill.kernels.cpp_build import cpu_flags, load_extension

logger = logging.getLogger(__name__)

EXT_NAME = "tokenmill_cpu_fused"


@functools.cache
def load_cpu_fused() -> Any | None:
    """`torch.ops.tokenmill_cpu_fused`, or None where it cannot be had (it needs AVX-512)."""
    if not {"avx512f", "avx512bw"} <= cpu_flags():
        logger.info("this CPU has no AVX-512: the decoder layer runs unfused")
        return None
    # Built without contraction into fused multiply-adds (cpp_build.BUILD_FLAGS): PyTorch
    # rounds the product and the sum apart.
    return load_extension(EXT_NAME, "fused_ops.cpp", "silu_mul", "fused CPU layer ops")


def fused_ops(x: torch.Tensor) -> Any | None:
    if x.dtype != torch.bfloat16 or x.device.type != "cpu":
        return None
    return load_cpu_fused()
