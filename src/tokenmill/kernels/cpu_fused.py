"""Fused bfloat16 CPU ops of the decoder layer (csrc/fused_ops.cpp): residual add + RMSNorm,
RoPE + KV-cache write, SwiGLU and GeGLU. Each replaces a dozen small aten ops whose dispatch,
not their arithmetic, dominates a decode step; they round exactly where the PyTorch code does.

`fused_ops(x)` gives the op namespace when `x` can take them (a bfloat16 CPU tensor and the
extension built), else None and the caller runs its PyTorch code. `decode_layer` runs a whole
decoder layer of decode rows (its arguments gathered once in `DecodeLayerWeights`).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
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


@dataclass(frozen=True)
class DecodeLayerWeights:
    """The fixed arguments of `decode_layer` for one decoder layer, gathered once: packed
    weights and their bit widths (`quant.packing.pack_tiles`), the norms, the RoPE tables."""

    input_norm: torch.Tensor  # [hidden]
    post_norm: torch.Tensor  # [hidden]
    eps: float
    qkv_w: torch.Tensor
    qkv_bits: int
    qkv_bias: torch.Tensor | None
    o_w: torch.Tensor
    o_bits: int
    gate_up_w: torch.Tensor
    gate_up_bits: int
    down_w: torch.Tensor
    down_bits: int
    intermediate: int
    cos: torch.Tensor  # [max_positions, D]
    sin: torch.Tensor
    scale: float
    num_heads: int
    num_kv_heads: int
    q_norm: torch.Tensor | None = None  # [D]: an RMSNorm per head on q, then on k (Qwen3, Gemma 3)
    k_norm: torch.Tensor | None = None
    window: int = 0  # > 0: a sliding window of that many keys
    softcap: float = 0.0  # > 0: attention scores capped at softcap * tanh(score / softcap)
    # Gemma: post_norm normalizes the attention output before its residual add, pre_ff_norm
    # the stream before the MLP, post_ff_norm the MLP output (both or neither).
    pre_ff_norm: torch.Tensor | None = None  # [hidden]
    post_ff_norm: torch.Tensor | None = None
    activation: str = "silu"  # of the gate: "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    # Every norm weight is bfloat16 (the normalized row rounded, then times the weight) or
    # float32 (times the weight in float32, then rounded: Gemma's 1 + w).

    def __post_init__(self) -> None:
        # The op's argument order, split around the per-step arguments (kept as tuples: a
        # decode step calls this once per layer and attribute lookups add up).
        pre = (self.input_norm, self.post_norm, self.eps, self.qkv_w, self.qkv_bits,
               self.qkv_bias, self.o_w, self.o_bits, self.gate_up_w, self.gate_up_bits,
               self.down_w, self.down_bits, self.intermediate, self.cos, self.sin)  # fmt: skip
        object.__setattr__(self, "pre", pre)
        post: tuple[Any, ...] = (
            self.scale,
            self.num_heads,
            self.num_kv_heads,
            self.q_norm,
            self.k_norm,
            self.window,
        )
        # Llama's call passes only the above: the rest are the op's defaults
        gemma_norms = self.pre_ff_norm is not None or self.post_ff_norm is not None
        if self.softcap or gemma_norms or self.activation != "silu":
            post = (*post, self.softcap, self.pre_ff_norm, self.post_ff_norm, self.activation)
        object.__setattr__(self, "post", post)


def decode_layer(
    ops: Any,
    w: DecodeLayerWeights,
    x: torch.Tensor,
    residual: torch.Tensor | None,
    positions: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    block_tables: torch.Tensor,
    ctx_lens: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole decoder layer for decode rows in one call: x -> [RMSNorm -> GQA attention with
    RoPE (KV written to the cache) -> +] -> [RMSNorm -> SwiGLU -> +] (Gemma: a norm after the
    attention and after the MLP too, GeGLU), calling the quantized matmul and the paged decode
    attention through the dispatcher, the same kernels in the same order as the unfused layer.
    x, residual: [B, hidden] bfloat16, the stream is x + residual; returns (out, residual), the
    layer's output stream being out + residual (the next layer's norm adds them)."""
    return ops.decode_layer.default(
        x, residual, *w.pre, positions, k_cache, v_cache, slot_mapping, block_tables, ctx_lens,
        *w.post,
    )  # fmt: skip
