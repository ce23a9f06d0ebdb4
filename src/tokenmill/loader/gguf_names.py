"""GGUF tensor names to HF parameter names, per architecture, and the q/k row order llama.cpp's
converter gives some architectures (undone by `unpermute`)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch

from tokenmill.errors import ModelLoadError
from tokenmill.quant.packing import QuantizedTensor

# llama.cpp's converter interleaves q/k rows per head for these (LlamaModel.permute); qwen2 is not.
PERMUTED_ARCHS = frozenset({"llama"})

_TOP_LEVEL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q_norm": "self_attn.q_norm",  # qwen3: per-head RMSNorm weights [head_dim]
    "attn_k_norm": "self_attn.k_norm",
    "attn_qkv": "self_attn.qkv_proj",  # phi3: q, k, v rows fused, as in the HF checkpoint
    # Mixture of experts: the router [E, hidden]; each projection's experts stacked in one 3-D
    # tensor [E, rows, cols] (split per expert by iter_tensors); Qwen2-MoE's shared expert.
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.experts.gate_proj",
    "ffn_up_exps": "mlp.experts.up_proj",
    "ffn_down_exps": "mlp.experts.down_proj",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
}
# Gemma: four norms per layer (ffn_norm is the one before the MLP) and Gemma 3's q/k norms.
_GEMMA_LAYER_NAMES = {
    **_LAYER_NAMES,
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
}
# llama.cpp's converter stores Gemma's norm weights as 1 + w (the scale itself); HF keeps w.
NORM_PLUS_ONE_ARCHS = frozenset({"gemma2", "gemma3"})
# Per-architecture names: llama.cpp's phi3 `ffn_up` holds gate and up rows (HF gate_up_proj).
_ARCH_LAYER_NAMES = {"phi3": {**_LAYER_NAMES, "ffn_up": "mlp.gate_up_proj"}}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# Mixtral GGUFs converted before llama.cpp stacked the experts: one 2-D tensor per expert.
_EXPERT_RE = re.compile(r"blk\.(\d+)\.ffn_(gate|up|down)\.(\d+)\.weight")
# Not HF parameters: llama3 rope frequency factors and phi3's longrope factors, turned back
# into rope_scaling instead (gguf_config).
_IGNORED_TENSORS = frozenset(
    {"rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"}
)


def hf_name(gguf_name: str, arch: str, path: Path) -> str | None:
    """The HF parameter name of a GGUF tensor of a model of `arch` (`path`: the file, for the
    error); None for tensors HF has no parameter for."""
    if gguf_name in _TOP_LEVEL_NAMES:
        return _TOP_LEVEL_NAMES[gguf_name]
    if gguf_name in _IGNORED_TENSORS:
        return None
    m = _EXPERT_RE.fullmatch(gguf_name)
    if m is not None:
        layer, proj, expert = m.groups()
        return f"model.layers.{layer}.mlp.experts.{expert}.{proj}_proj.weight"
    m = _LAYER_RE.fullmatch(gguf_name)
    names = (
        _GEMMA_LAYER_NAMES
        if arch in NORM_PLUS_ONE_ARCHS
        else _ARCH_LAYER_NAMES.get(arch, _LAYER_NAMES)
    )
    if m is None or m.group(2) not in names:
        raise ModelLoadError(
            f"GGUF file {path}: unexpected tensor {gguf_name!r} for architecture {arch!r}"
        )
    return f"model.layers.{m.group(1)}.{names[m.group(2)]}.{m.group(3)}"


def unpermute(w: torch.Tensor | QuantizedTensor, n_head: int) -> torch.Tensor | QuantizedTensor:
    """Inverse of llama.cpp's LlamaModel.permute: rows [h, 2, d/2] were stored as [h, d/2, 2]."""
    if isinstance(w, QuantizedTensor):  # whole rows of blocks move
        return dataclasses.replace(w, blocks=unpermute(w.blocks, n_head))
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
