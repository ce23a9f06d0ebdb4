"""Phi-3 / Phi-4 decoder (HF `Phi3ForCausalLM`; Phi-4-mini is the same class).

The graph is llama.py's: x -> [RMSNorm -> GQA attention with RoPE -> +] -> [RMSNorm -> SwiGLU
-> +], no biases. What differs is the checkpoint: it stores q/k/v as one `self_attn.qkv_proj`
(rows q, then k, then v) and gate/up as one `mlp.gate_up_proj` (rows gate, then up: HF chunks
it as `gate, up`), which are exactly our MergedLinear layouts, so they load whole, as stored
(LlamaForCausalLM.load_weights), dense or quantized. A config's `sliding_window` windows every
layer's attention, as for Mistral (llama.sliding_windows).
"""

from __future__ import annotations

import torch

from tokenmill.config import ModelConfig
from tokenmill.errors import ModelLoadError
from tokenmill.models.llama import LlamaForCausalLM
from tokenmill.quant.base import QuantScheme


class Phi3ForCausalLM(LlamaForCausalLM):
    def __init__(
        self,
        cfg: ModelConfig,
        dtype: torch.dtype,
        max_positions: int,
        quant: QuantScheme = None,
    ) -> None:
        rope = cfg.hf_config.get("rope_parameters") or {}
        partial = rope.get("partial_rotary_factor", cfg.hf_config.get("partial_rotary_factor"))
        if partial not in (None, 1, 1.0):
            # Our RotaryEmbedding rotates whole heads; Phi-4-mini rotates only the first 3/4.
            raise ModelLoadError(
                f"Phi3ForCausalLM with partial_rotary_factor {partial} is not supported yet "
                "(RoPE over part of each head)"
            )
        super().__init__(cfg, dtype, max_positions, quant)
