"""OLMoE (HF `OlmoeForCausalLM`): Llama's graph with q/k RMSNorm and a sparse MoE block on
every layer.

Unlike Qwen3's per-head norms, OLMoE normalizes q and k over the whole projection: q_norm has
num_heads * head_dim weights and k_norm num_kv_heads * head_dim, applied to the projections
before they are split into heads (then RoPE). `clip_qkv`, when set, clamps q, k and v after the
norms. The router: softmax in float32, top-k, renormalised only with `norm_topk_prob`.
"""

from __future__ import annotations

import torch

from tokenmill.config import ModelConfig
from tokenmill.layers.norm import RMSNorm
from tokenmill.layers.rotary import RotaryEmbedding
from tokenmill.models.llama import LlamaAttention
from tokenmill.models.moe import MoeDecoderLayer, MoeForCausalLM, MoeModel
from tokenmill.quant.base import QuantScheme


class OlmoeAttention(LlamaAttention):
    def __init__(
        self,
        cfg: ModelConfig,
        rotary: RotaryEmbedding,
        dtype: torch.dtype,
        quant: QuantScheme,
        sliding_window: int | None = None,
    ) -> None:
        super().__init__(cfg, rotary, dtype, quant, sliding_window)
        q_size, kv_size = self.split[0], self.split[1]
        self.q_norm = RMSNorm(q_size, cfg.rms_norm_eps, dtype)  # [H D]
        self.k_norm = RMSNorm(kv_size, cfg.rms_norm_eps, dtype)  # [H_kv D]
        self.clip_qkv: float | None = cfg.hf_config.get("clip_qkv")

    def qkv(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split(self.split, dim=-1)  # [T, H D], [T, H_kv D] x 2
        q, _ = self.q_norm(q.contiguous())
        k, _ = self.k_norm(k.contiguous())
        qkv = torch.cat((q, k, v), dim=-1)  # [T, (H + 2 H_kv) D]
        if self.clip_qkv is not None:
            qkv = qkv.clamp(-self.clip_qkv, self.clip_qkv)
        return qkv


class OlmoeDecoderLayer(MoeDecoderLayer):
    attention_cls = OlmoeAttention


class OlmoeModel(MoeModel):
    decoder_layer_cls = OlmoeDecoderLayer


class OlmoeForCausalLM(MoeForCausalLM):
    model_cls = OlmoeModel
