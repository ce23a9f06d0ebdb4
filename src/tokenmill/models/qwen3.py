"""Qwen3 (dense) decoder: the Llama graph plus a per-head RMSNorm on q and k before RoPE.

x -> [RMSNorm -> GQA attention (q_norm, k_norm per head, then RoPE) -> +] -> [RMSNorm -> SwiGLU
-> +]. Qwen3 gives head_dim explicitly (128 where hidden / heads would be 64 on the small
models), has no q/k/v bias by default (`attention_bias`) and ties the embeddings on the small
models; ModelConfig reads all three. Everything but the attention is llama.py's.
"""

from __future__ import annotations

import torch

from tokenmill.config import ModelConfig
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

    def qkv(self, x: torch.Tensor) -> torch.Tensor:
        num_tokens = x.shape[0]  # x: [T, hidden]
        q, k, v = self.qkv_proj(x).split(self.split, dim=-1)
        # Normalize each head's q and k: rows of [T * H, D] (the norm takes 2-D input), then
        # pack them again for the fused RoPE + cache write or the unfused split.
        q, _ = self.q_norm(q.reshape(-1, self.head_dim))  # [T * H, D]
        k, _ = self.k_norm(k.reshape(-1, self.head_dim))  # [T * H_kv, D]
        return torch.cat((q.view(num_tokens, -1), k.view(num_tokens, -1), v), dim=-1)


class Qwen3DecoderLayer(LlamaDecoderLayer):
    # The fused whole-layer decode (FusedDecodeLayer) finds `q_norm` and `k_norm` on the
    # attention and applies them per head before RoPE, as Qwen3Attention.forward does.
    attention_cls = Qwen3Attention


class Qwen3Model(LlamaModel):
    decoder_layer_cls = Qwen3DecoderLayer


class Qwen3ForCausalLM(LlamaForCausalLM):
    model_cls = Qwen3Model
