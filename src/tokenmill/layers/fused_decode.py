"""The adapter between a Llama-style decoder layer and the fused C++ decode layer
(`kernels.cpu_fused.decode_layer`): when a step has decode rows only, its attention backend runs
the C++ decode kernel and the layer's four matmuls are packed quantized blocks, the whole layer
is one call, with no Python between its kernels. Otherwise the layer runs its own code."""

from __future__ import annotations

from typing import Any

import torch

from tokenmill.kernels.cpu_fused import DecodeLayerWeights, decode_layer, fused_ops
from tokenmill.layers.forward_context import ForwardContext
from tokenmill.quant.block import DENSE_ABOVE_ROWS, BlockQuantMethod


class FusedDecodeLayer:
    """Wraps one decoder layer with `input_layernorm`, `post_attention_layernorm`,
    `self_attn` (qkv_proj, o_proj, rotary, attn, num_heads, num_kv_heads, and optionally
    q_norm / k_norm, RMSNorm modules per head) and `mlp` (gate_up_proj, down_proj). Whether
    the layer can be fused is decided at its first decode step, after the weights are packed."""

    def __init__(self, layer: Any) -> None:
        self._layer = layer
        self._weights: DecodeLayerWeights | None = None
        self._ops: Any = None
        self._decided = False

    @property
    def active(self) -> bool:
        """Whether the layer's decode steps run fused (known after its first decode step)."""
        return self._weights is not None

    def __call__(
        self,
        positions: torch.Tensor,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        ctx: ForwardContext,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(out, residual) of the whole layer, or None where the layer must run unfused."""
        if x.shape[0] > DENSE_ABOVE_ROWS:  # rows that take the dense bf16 matmul
            return None
        attn = self._layer.self_attn.attn
        args = attn.backend.decode_kernel_args(ctx.attn_metas[attn.kv_group])
        if args is None:  # prompt chunks in the step, or not the C++ decode kernel
            return None
        if not self._decided:
            self._ops = fused_ops(x)
            self._weights = None if self._ops is None else _gather_weights(self._layer)
            self._decided = True
        if self._weights is None:
            return None
        block_tables, ctx_lens = args
        return decode_layer(
            self._ops, self._weights, x, residual, positions, attn.k_cache, attn.v_cache,
            ctx.slot_mappings[attn.kv_group], block_tables, ctx_lens,
        )  # fmt: skip


def _gather_weights(layer: Any) -> DecodeLayerWeights | None:
    attn, mlp = layer.self_attn, layer.mlp
    linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
    methods = [lin.quant_method for lin in linears]
    if not all(isinstance(m, BlockQuantMethod) and m.packed is not None for m in methods) or any(
        lin.bias is not None for lin in linears[1:]
    ):
        return None
    if attn.rotary.rotary_dim != attn.head_dim:
        return None  # the C++ layer rotates whole heads: its cos/sin must span head_dim
    qkv, o, gate_up, down = methods
    norm = layer.input_layernorm
    # Qwen3 norms each q and k head before RoPE; the op does it with the layer's eps.
    if attn.attn.softcap is not None:  # the C++ decode attention has no soft-capping
        return None
    q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
    if (q_norm is None) != (k_norm is None):
        return None
    if q_norm is not None and not (q_norm.eps == k_norm.eps == norm.eps):
        return None
    return DecodeLayerWeights(
        input_norm=norm.weight,
        post_norm=layer.post_attention_layernorm.weight,
        eps=norm.eps,
        qkv_w=qkv.packed,
        qkv_bits=qkv.bits,
        qkv_bias=attn.qkv_proj.bias,
        o_w=o.packed,
        o_bits=o.bits,
        gate_up_w=gate_up.packed,
        gate_up_bits=gate_up.bits,
        down_w=down.packed,
        down_bits=down.bits,
        intermediate=mlp.down_proj.in_features,
        cos=attn.rotary.cos,
        sin=attn.rotary.sin,
        scale=attn.attn.scale,
        num_heads=attn.num_heads,
        num_kv_heads=attn.num_kv_heads,
        q_norm=None if q_norm is None else q_norm.weight,
        k_norm=None if k_norm is None else k_norm.weight,
        window=attn.attn.sliding_window or 0,
    )
