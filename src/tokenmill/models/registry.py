"""HF `architectures[0]` -> model class."""

from __future__ import annotations

import torch
from torch import nn

from tokenmill.config import ModelConfig
from tokenmill.errors import ModelLoadError
from tokenmill.models.gemma import Gemma2ForCausalLM, Gemma3ForCausalLM
from tokenmill.models.llama import LlamaForCausalLM
from tokenmill.models.mixtral import MixtralForCausalLM
from tokenmill.models.olmoe import OlmoeForCausalLM
from tokenmill.models.phi3 import Phi3ForCausalLM
from tokenmill.models.qwen3 import Qwen3ForCausalLM
from tokenmill.models.qwen_moe import Qwen2MoeForCausalLM, Qwen3MoeForCausalLM
from tokenmill.quant.base import QuantScheme

# Qwen2 and Mistral are the Llama graph: Qwen2 adds q/k/v bias (ModelConfig.attention_bias);
# their sliding windows are per-layer attention parameters (llama.sliding_windows).
_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Gemma2ForCausalLM": Gemma2ForCausalLM,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,  # q/k norm per head (models/qwen3.py)
    "Phi3ForCausalLM": Phi3ForCausalLM,  # fused qkv / gate_up as stored (models/phi3.py)
    # Mixture-of-experts: a sparse MoE block (layers/moe.py) in place of the MLP
    "MixtralForCausalLM": MixtralForCausalLM,
    "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,  # + a gated shared expert
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,  # Qwen3's per-head q/k norm
    "OlmoeForCausalLM": OlmoeForCausalLM,  # q/k norm over the whole projection
}

SUPPORTED_ARCHITECTURES = tuple(_REGISTRY)


def model_class(architecture: str) -> type[nn.Module] | None:
    """The class that builds `architecture` (None: unsupported)."""
    return _REGISTRY.get(architecture)


def build_model(
    cfg: ModelConfig, dtype: torch.dtype, max_positions: int, quant: QuantScheme = None
) -> nn.Module:
    """The model, its linear layers built for weights that arrive as `quant`."""
    cls = _REGISTRY.get(cfg.architecture)
    if cls is None:
        raise ModelLoadError(
            f"unsupported architecture {cfg.architecture!r}; supported: "
            + ", ".join(SUPPORTED_ARCHITECTURES)
        )
    return cls(cfg, dtype, max_positions, quant)
