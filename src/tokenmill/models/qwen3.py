"""Qwen3 (dense) decoder: the Llama graph plus a per-head RMSNorm on q and k before RoPE.

x -> [RMSNorm -> GQA attention (q_norm, k_norm per head, then RoPE) -> +] -> [RMSNorm -> SwiGLU
-> +]. Qwen3 gives head_dim explicitly (128 where hidden / heads would be 64 on the small
models), has no q/k/v bias by default (`attention_bias`) and ties the embeddings on the small
models; ModelConfig reads all three. Everything but the attention is llama.py's.
"""

from __future__ import annotations

import torch

from tokenmill.config import ModelConfig
from tokenmill.kernels.cpu_fused import fused_ops
from tokenmill.layers.forward_context import ForwardContext
from tokenmill.layers.linear import Linear
from tokenmill.layers.norm import RMSNorm
from tokenmill.layers.rotary import RotaryEmbedding
from tokenmill.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaModel
from tokenmill.quant.base import QuantScheme


class Qwen3Attention(LlamaAttention):
    def __init__(
        self,
        cfg: ModelConfig,
        rotary: RotaryEmbedding,
        dtype: torch.dtype,
        quant: QuantScheme,
        sliding_window: int | None = None,
    ) -> None:
        super().__init__(cfg, rotary, dtype, quant, sliding_window)
        if cfg.attention_bias:  # unlike Qwen2, Qwen3's attention_bias covers o_proj too
            self.o_proj = Linear(
                self.num_heads * self.head_dim, cfg.hidden_size, bias=True, dtype=dtype,
                quant=quant,
            )  # fmt: skip
        # One weight over head_dim, shared by every head (HF's Qwen3RMSNorm(head_dim)).
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, dtype)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, dtype)

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, ctx: ForwardContext
    ) -> torch.Tensor:
        num_tokens = x.shape[0]  # x: [T, hidden]
        qkv = self.qkv_proj(x)  # [T, (H + 2 H_kv) D]
        q, k, v = qkv.split(self.split, dim=-1)
        # Normalize each head's q and k: rows of [T * H, D] (the norm takes 2-D input).
        q, _ = self.q_norm(q.reshape(-1, self.head_dim))  # [T * H, D]
        k, _ = self.k_norm(k.reshape(-1, self.head_dim))  # [T * H_kv, D]
        ops = fused_ops(qkv)
        # the fused op's cos/sin span the whole head: partial rotary takes the unfused path
        if (
            ops is not None
            and self.attn.k_cache is not None
            and self.rotary.rotary_dim == self.head_dim
        ):
            # The fused kernel reads packed q/k/v: repack the normalized q and k, then RoPE on
            # q and k and the cache writes in one call, as in LlamaAttention.
            qkv = torch.cat(
                (q.view(num_tokens, -1), k.view(num_tokens, -1), v), dim=-1
            )  # [T, (H + 2 H_kv) D]
            q = ops.rope_cache.default(
                qkv, positions, self.rotary.cos, self.rotary.sin, self.attn.k_cache,
                self.attn.v_cache, ctx.slot_mapping, self.num_heads, self.num_kv_heads,
            )  # fmt: skip
            out = self.attn(q, None, None, ctx)
            return self.o_proj(out.reshape(num_tokens, -1))
        q = q.view(num_tokens, self.num_heads, self.head_dim)  # [T, H, D]
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)  # [T, H_kv, D]
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        q, k = self.rotary(positions, q, k)
        out = self.attn(q, k, v, ctx)  # [T, H, D]
        return self.o_proj(out.reshape(num_tokens, -1))


class Qwen3DecoderLayer(LlamaDecoderLayer):
    # The fused whole-layer decode (FusedDecodeLayer) finds `q_norm` and `k_norm` on the
    # attention and applies them per head before RoPE, as Qwen3Attention.forward does.
    attention_cls = Qwen3Attention


class Qwen3Model(LlamaModel):
    decoder_layer_cls = Qwen3DecoderLayer


class Qwen3ForCausalLM(LlamaForCausalLM):
    model_cls = Qwen3Model
