"""Qwen2-MoE and Qwen3-MoE (HF `Qwen2MoeForCausalLM`, `Qwen3MoeForCausalLM`).

Qwen2-MoE: Qwen2's attention (q/k/v bias, `qkv_bias` in its config) and on each sparse layer
the top-k experts plus a shared expert that every token runs, scaled by
sigmoid(shared_expert_gate(x)). Qwen3-MoE: Qwen3's attention (per-head q/k RMSNorm before
RoPE, models/qwen3.py) and no shared expert. Both: softmax in float32, top-k, divided by their
sum only with `norm_topk_prob`, then rounded to the activations' dtype; dense MLP layers where
`mlp_only_layers` or `decoder_sparse_step` say so (models/moe.QwenMoeModel).
"""

from __future__ import annotations

import dataclasses

import torch

from tokenmill.config import ModelConfig
from tokenmill.models.moe import MoeDecoderLayer, MoeForCausalLM, QwenMoeModel
from tokenmill.models.qwen3 import Qwen3Attention
from tokenmill.quant.base import QuantScheme


class Qwen2MoeForCausalLM(MoeForCausalLM):
    model_cls = QwenMoeModel

    def __init__(
        self,
        cfg: ModelConfig,
        dtype: torch.dtype,
        max_positions: int,
        quant: QuantScheme = None,
    ) -> None:
        # Qwen2-MoE names its q/k/v bias `qkv_bias` (default on); o_proj has none.
        bias = bool(cfg.hf_config.get("qkv_bias", cfg.attention_bias))
        super().__init__(dataclasses.replace(cfg, attention_bias=bias), dtype, max_positions, quant)


class Qwen3MoeDecoderLayer(MoeDecoderLayer):
    attention_cls = Qwen3Attention


class Qwen3MoeModel(QwenMoeModel):
    decoder_layer_cls = Qwen3MoeDecoderLayer


class Qwen3MoeForCausalLM(MoeForCausalLM):
    model_cls = Qwen3MoeModel
