"""Mixtral (HF `MixtralForCausalLM`): Mistral's attention, a sparse MoE block on every layer.

The router keeps the top 2 of 8 experts by softmax probability and renormalises their weights
to sum to 1 (always: Mixtral has no norm_topk_prob); the weights stay float32 while they scale
each expert's output (transformers' MixtralExperts). HF folders store the block as
`block_sparse_moe` with experts' `w1` (gate), `w3` (up) and `w2` (down); they load under the
names the other MoE families use.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from tokenmill.config import ModelConfig
from tokenmill.layers.moe import SparseMoeBlock
from tokenmill.models.moe import MoeForCausalLM, MoeModel, moe_args
from tokenmill.quant.base import QuantScheme

_EXPERT_PROJ = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_EXPERT_RE = re.compile(r"(.*\.experts\.\d+)\.(w[123])\.weight")


class MixtralModel(MoeModel):
    def build_mlp(
        self, cfg: ModelConfig, layer_idx: int, dtype: torch.dtype, quant: QuantScheme
    ) -> nn.Module:
        return SparseMoeBlock(
            **moe_args(cfg), renormalize=True, dtype=dtype, quant=quant,
            weights_in_act_dtype=False,
        )  # fmt: skip


class MixtralForCausalLM(MoeForCausalLM):
    model_cls = MixtralModel

    def checkpoint_name(self, name: str) -> str:
        name = name.replace(".block_sparse_moe.", ".mlp.")
        m = _EXPERT_RE.fullmatch(name)
        if m is not None:
            return f"{m.group(1)}.{_EXPERT_PROJ[m.group(2)]}.weight"
        return name
