"""Phi-3 / Phi-4 decoder (HF `Phi3ForCausalLM`; Phi-4-mini is the same class).

The graph is llama.py's: x -> [RMSNorm -> GQA attention with RoPE -> +] -> [RMSNorm -> SwiGLU
-> +], no biases. What differs is the checkpoint and the config, both handled where Llama's are:
- the checkpoint stores q/k/v as one `self_attn.qkv_proj` (rows q, then k, then v) and gate/up
  as one `mlp.gate_up_proj` (rows gate, then up: HF chunks it as `gate, up`), exactly our
  MergedLinear layouts, so they load whole, as stored (LlamaForCausalLM.load_weights), dense or
  as quantized blocks;
- partial rotary (Phi-4-mini rotates 3/4 of each head) and longrope (the 128k models) come from
  `RotaryEmbedding.from_config`;
- a config's `sliding_window` windows every layer's attention, as Mistral's does
  (llama.sliding_windows).
"""

from __future__ import annotations

from tokenmill.models.llama import LlamaForCausalLM


class Phi3ForCausalLM(LlamaForCausalLM):
    """LlamaForCausalLM under Phi-3's name: nothing in the graph differs (see the module doc)."""
