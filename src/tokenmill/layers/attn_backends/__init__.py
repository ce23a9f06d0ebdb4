"""Attention backends behind one interface (`base.AttentionBackend`), picked once per runner.

`cpu`: the C++ decode kernel over the paged cache (CPU; JIT-built, `kernels.cpu_attention`).
`sdpa`: the PyTorch reference (CPU and GPU). `triton`: one ragged Triton kernel for the whole
batch (the GPU path, CUDA-graph safe). `unified-ref`: that kernel's PyTorch oracle.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from tokenmill.config import ATTENTION_BACKENDS
from tokenmill.kernels import cpu_attention
from tokenmill.layers.attn_backends.base import AttentionBackend
from tokenmill.layers.attn_backends.cpu import CpuKernelBackend
from tokenmill.layers.attn_backends.sdpa import SdpaBackend
from tokenmill.layers.attn_backends.unified import TritonBackend, UnifiedRefBackend


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve_backend_name(name: str, device: str) -> str:
    """Resolves "auto" and checks the choice against the device."""
    on_cuda = device.startswith("cuda")
    if name == "auto":
        if on_cuda:
            return "triton" if triton_available() else "sdpa"
        return "cpu" if cpu_attention.load_cpu_attention() is not None else "sdpa"
    if name == "cpu" and on_cuda:
        raise ValueError("attention_backend='cpu' runs on the CPU only; use triton or sdpa")
    if name == "cpu" and cpu_attention.load_cpu_attention() is None:
        raise ValueError("attention_backend='cpu': the C++ attention kernel could not be built")
    if name == "triton" and not triton_available():
        raise ValueError("attention_backend='triton' needs the triton package (pip install triton)")
    if name == "triton" and not on_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "attention_backend='triton' runs on a CUDA device (on the CPU only under Triton's "
            "slow interpreter, TRITON_INTERPRET=1, for tests); use cpu or sdpa here"
        )
    if name not in ATTENTION_BACKENDS:
        raise ValueError(
            f"unknown attention_backend {name!r}; one of {', '.join(ATTENTION_BACKENDS)}"
        )
    return name


def select_backend(
    name: str,
    device: str,
    *,
    head_dim: int,
    dtype: torch.dtype,
    batch_invariant: bool = False,
) -> AttentionBackend:
    """The backend the runner binds to every attention layer."""
    name = resolve_backend_name(name, device)
    if name == "cpu":
        if not cpu_attention.supports(head_dim, dtype):  # the reference takes any shape
            return SdpaBackend()
        return CpuKernelBackend(batch_invariant)
    if name == "triton":
        return TritonBackend(batch_invariant)
    if name == "unified-ref":
        return UnifiedRefBackend()
    return SdpaBackend()
