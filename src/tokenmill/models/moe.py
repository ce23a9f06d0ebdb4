"""What the mixture-of-experts decoders share: the Llama graph with a sparse MoE block
(layers/moe.py) in place of the MLP on the layers that have one, and the loading of expert
weights whatever their checkpoint layout.

x -> [RMSNorm -> attention -> +] -> [RMSNorm -> router -> top-k experts (+ shared) -> +].

Expert weights arrive per expert (`mlp.experts.{e}.gate_proj.weight`, as HF folders store them
and as the GGUF reader splits its stacked tensors) or stacked (`mlp.experts.gate_up_proj`
[E, 2 I, hidden] and `mlp.experts.down_proj` [E, hidden, I], transformers' in-memory layout);
stacked ones are split per expert here, so every expert loads through Llama's fused-shard path.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from tokenmill.config import ModelConfig
from tokenmill.errors import ModelLoadError
from tokenmill.layers.expert_source import MappedSource
from tokenmill.layers.forward_context import ForwardContext
from tokenmill.layers.moe import SparseMoeBlock
from tokenmill.layers.norm import RMSNorm
from tokenmill.layers.rotary import RotaryEmbedding
from tokenmill.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP, LlamaModel
from tokenmill.quant.base import QuantScheme

_STACKED = re.compile(r"(.*\.mlp\.experts)\.(gate_up_proj|down_proj)")
_EXPERT_WEIGHT = re.compile(r"(.*\.mlp\.experts\.\d+)\.(gate_proj|up_proj|down_proj)\.weight")


class MoeDecoderLayer(LlamaDecoderLayer):
    """A Llama decoder layer whose `mlp` the model sets after construction (a SparseMoeBlock,
    or a dense MLP on Qwen-MoE's dense layers): which one depends on the layer's index. It has
    no fused whole-layer decode (the C++ layer has no MoE block): it always runs its own code."""

    def __init__(
        self,
        cfg: ModelConfig,
        rotary: RotaryEmbedding,
        dtype: torch.dtype,
        quant: QuantScheme,
        sliding_window: int | None = None,
    ) -> None:
        nn.Module.__init__(self)  # not LlamaDecoderLayer's: it would build a dense MLP
        self.self_attn = self.attention_cls(cfg, rotary, dtype, quant, sliding_window)
        self.mlp: nn.Module | None = None
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    def forward(
        self,
        positions: torch.Tensor,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        ctx: ForwardContext,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(positions, h, ctx)
        h, residual = self.post_attention_layernorm(h, residual)
        assert self.mlp is not None
        return self.mlp(h), residual


def moe_args(cfg: ModelConfig) -> dict[str, Any]:
    """SparseMoeBlock's sizes from an HF config: Mixtral names the expert count
    num_local_experts and sizes experts by intermediate_size; Qwen-MoE by moe_intermediate_size
    (its intermediate_size is the dense layers'); OLMoE by intermediate_size."""
    hf = cfg.hf_config
    return dict(
        hidden_size=cfg.hidden_size,
        num_experts=int(hf.get("num_local_experts") or hf["num_experts"]),
        top_k=int(hf["num_experts_per_tok"]),
        intermediate_size=int(hf.get("moe_intermediate_size") or cfg.intermediate_size),
    )


class MoeModel(LlamaModel):
    decoder_layer_cls = MoeDecoderLayer

    def __init__(
        self, cfg: ModelConfig, dtype: torch.dtype, max_positions: int, quant: QuantScheme
    ) -> None:
        super().__init__(cfg, dtype, max_positions, quant)
        for i, layer in enumerate(self.layers):
            layer.mlp = self.build_mlp(cfg, i, dtype, quant)

    def build_mlp(
        self, cfg: ModelConfig, layer_idx: int, dtype: torch.dtype, quant: QuantScheme
    ) -> nn.Module:
        """Layer `layer_idx`'s feed-forward; every layer is sparse unless a family says not."""
        hf = cfg.hf_config
        return SparseMoeBlock(
            **moe_args(cfg), renormalize=bool(hf.get("norm_topk_prob", False)), dtype=dtype,
            quant=quant,
        )  # fmt: skip


class QwenMoeModel(MoeModel):
    """Qwen2-MoE and Qwen3-MoE: dense layers where `mlp_only_layers` names them or off the
    `decoder_sparse_step`; Qwen2-MoE adds a gated shared expert to every sparse layer."""

    def build_mlp(
        self, cfg: ModelConfig, layer_idx: int, dtype: torch.dtype, quant: QuantScheme
    ) -> nn.Module:
        hf = cfg.hf_config
        args = moe_args(cfg)
        sparse = (
            layer_idx not in (hf.get("mlp_only_layers") or [])
            and args["num_experts"] > 0
            and (layer_idx + 1) % int(hf.get("decoder_sparse_step", 1)) == 0
        )
        if not sparse:
            return LlamaMLP(cfg, dtype, quant)
        return SparseMoeBlock(
            **args, renormalize=bool(hf.get("norm_topk_prob", False)), dtype=dtype, quant=quant,
            shared_intermediate_size=hf.get("shared_expert_intermediate_size"),
        )  # fmt: skip


class MoeForCausalLM(LlamaForCausalLM):
    model_cls: type[LlamaModel] = MoeModel

    def checkpoint_name(self, name: str) -> str:
        """A checkpoint tensor's name in this model (a family with other names renames)."""
        return name

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> None:
        super().load_weights(self._per_expert(weights))

    def _per_expert(self, weights: Iterable[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
        for name, tensor in weights:
            name = self.checkpoint_name(name)
            if self._keep_mapped(name, tensor):
                continue
            m = _STACKED.fullmatch(name)
            if m is None:
                gate_row = name.endswith("shared_expert_gate.weight")
                if gate_row and isinstance(tensor, torch.Tensor) and tensor.dim() == 1:
                    tensor = tensor.unsqueeze(0)  # GGUF may store the [1, hidden] row as 1-D
                yield name, tensor
                continue
            prefix, kind = m.groups()
            if kind == "down_proj":  # [E, hidden, I]
                for e in range(tensor.shape[0]):
                    name = f"{prefix}.{e}.down_proj.weight"
                    if not self._keep_mapped(name, tensor[e]):
                        yield name, tensor[e]
            else:  # [E, 2 I, hidden]: gate rows, then up rows
                for e in range(tensor.shape[0]):
                    gate, up = tensor[e].chunk(2, dim=0)
                    for name, part in ((f"{prefix}.{e}.gate_proj.weight", gate),
                                       (f"{prefix}.{e}.up_proj.weight", up)):  # fmt: skip
                        if not self._keep_mapped(name, part):
                            yield name, part

    def _keep_mapped(self, name: str, tensor: Any) -> bool:
        """Hands an expert's weight to its mapped source (layers/expert_source.py), as given
        (a view of the checkpoint's map: not copied, not converted); False for any other."""
        m = _EXPERT_WEIGHT.fullmatch(name)
        if m is None:
            return False
        prefix, proj = m.groups()
        expert = self.get_submodule(prefix)
        lin, shard = (
            (expert.down_proj, None) if proj == "down_proj" else (expert.gate_up_proj, proj)
        )
        if not isinstance(lin.quant_method, MappedSource):
            return False
        start, end = (0, lin.out_features) if shard is None else lin.shard_offset(shard)
        rows = end - start
        if tuple(tensor.shape) != (rows, lin.in_features):
            raise ModelLoadError(
                f"tensor {name!r} has shape {tuple(tensor.shape)}, expected "
                f"{(rows, lin.in_features)}"
            )
        lin.load_quantized(tensor, shard)
        return True
