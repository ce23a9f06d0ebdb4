"""The adapter between a Llama- or Gemma-style decoder layer and the fused C++ decode layer
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
    q_norm / k_norm, RMSNorm modules per head) and `mlp` (gate_up_proj, down_proj); a Gemma
    layer also has `pre_feedforward_layernorm` and `post_feedforward_layernorm` (its
    post_attention_layernorm then normalizes the attention output, before the residual add).
    `offset_norms`: every norm multiplies by 1 + weight in float32 (Gemma's); `activation` of
    the MLP's gate: "silu" or "gelu_tanh". Whether the layer can be fused is decided at its
    first decode step, after the weights are packed."""

    def __init__(self, layer: Any, *, offset_norms: bool = False, activation: str = "silu") -> None:
        self._layer = layer
        self._offset_norms = offset_norms
        self._activation = activation
        self._weights: DecodeLayerWeights | None = None
        self._ops: Any = None
        self._decided = False

    def disable(self) -> None:
        """The layer always runs unfused (a tensor-parallel shard all-reduces between its
        matmuls, which the C++ layer cannot)."""
        self._weights, self._decided = None, True

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
            self._weights = None
            if self._ops is not None:
                self._weights = _gather_weights(self._layer, self._offset_norms, self._activation)
            self._decided = True
        if self._weights is None:
            return None
        block_tables, ctx_lens = args
        return decode_layer(
            self._ops, self._weights, x, residual, positions, attn.k_cache, attn.v_cache,
            ctx.slot_mappings[attn.kv_group], block_tables, ctx_lens,
        )  # fmt: skip


def _gather_weights(layer: Any, offset_norms: bool, activation: str) -> DecodeLayerWeights | None:
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
    pre_ff = getattr(layer, "pre_feedforward_layernorm", None)
    post_ff = getattr(layer, "post_feedforward_layernorm", None)
    if (pre_ff is None) != (post_ff is None):
        return None
    # Qwen3 and Gemma 3 norm each q and k head before RoPE; the op does it with the layer's eps.
    q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
    if (q_norm is None) != (k_norm is None):
        return None
    others = (layer.post_attention_layernorm, pre_ff, post_ff, q_norm, k_norm)
    if any(n is not None and n.eps != norm.eps for n in others):
        return None

    def weight(n: Any) -> torch.Tensor | None:
        # Gemma's offset: 1 + w in float32, as its norm computes it (the op multiplies in the
        # weight's dtype and rounds once); computed once, here, not per step.
        if n is None or not offset_norms:
            return None if n is None else n.weight
        return (1.0 + n.weight.float()).contiguous()

    return DecodeLayerWeights(
        input_norm=weight(norm),
        post_norm=weight(layer.post_attention_layernorm),
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
        q_norm=weight(q_norm),
        k_norm=weight(k_norm),
        window=attn.attn.sliding_window or 0,
        softcap=attn.attn.softcap or 0.0,
        pre_ff_norm=weight(pre_ff),
        post_ff_norm=weight(post_ff),
        activation=activation,
    )
