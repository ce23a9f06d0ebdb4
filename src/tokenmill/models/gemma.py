"""Gemma 2 and Gemma 3 (text) decoders.

Per layer: x -> [RMSNorm -> attention -> RMSNorm -> +] -> [RMSNorm -> GeGLU -> RMSNorm -> +],
a norm before and after both the attention and the MLP. Where Gemma departs from Llama:

- embeddings scaled by sqrt(hidden_size) (the factor rounded to the activation dtype, as HF);
- RMSNorm weights are stored as offsets: the norm multiplies by (1 + weight), in fp32, and
  casts afterwards (Llama casts, then multiplies);
- GeGLU MLP: gelu (tanh approximation) on the gate;
- attention scale query_pre_attn_scalar ** -0.5 instead of head_dim ** -0.5;
- local (sliding-window) and global layers interleaved (`layer_types`: Gemma 2 alternates,
  Gemma 3 has one global layer in `sliding_window_pattern`); the window, the scale and Gemma 2's
  attention-logit soft-cap are parameters of the attention backend;
- Gemma 2 soft-caps the final logits too: cap * tanh(logits / cap);
- Gemma 3 normalizes q and k per head (q_norm, k_norm) before RoPE, and its local layers use
  their own RoPE base (rope_local_base_freq) with no scaling, its global ones rope_theta with
  the configured scaling;
- tied embeddings.

The batch is ragged and packed: every activation is [num_tokens, ...] with no padding. Decode
steps of bf16 layers with packed quantized weights run the whole layer as one C++ call
(`FusedDecodeLayer`, with Gemma's norms, GeGLU and soft-cap), which rounds where the PyTorch
code below does; that code does not use the separate fused norm / RoPE / SwiGLU ops of Llama.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.config import ModelConfig
from tokenmill.errors import ModelLoadError
from tokenmill.layers.forward_context import ForwardContext
from tokenmill.layers.fused_decode import FusedDecodeLayer
from tokenmill.layers.linear import Linear
from tokenmill.layers.rotary import RotaryEmbedding, rope_type_of
from tokenmill.models.llama import LlamaAttention, LlamaForCausalLM, LlamaMLP
from tokenmill.quant.base import QuantScheme

SLIDING, FULL = "sliding_attention", "full_attention"


class GemmaRMSNorm(nn.Module):
    """RMSNorm with the weight stored as an offset from 1, over the last dim of any shape."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # HF: normalize in fp32, multiply by (1 + w) in fp32, then cast to x's dtype (the fused
        # C++ add_rms_norm casts first and multiplies in bf16: not the same rounding).
        normed = F.rms_norm(x.float(), (x.shape[-1],), None, self.eps)
        return (normed * (1.0 + self.weight.float())).to(x.dtype)


def layer_types(hf: dict[str, Any], num_layers: int, pattern: int) -> list[str]:
    """`layer_types` if the config lists them, else every `pattern`-th layer global (Gemma 2:
    2, alternating from a local layer 0; Gemma 3: `sliding_window_pattern`, default 6)."""
    types = hf.get("layer_types")
    if types:
        return list(types)
    pattern = hf.get("sliding_window_pattern", pattern)
    return [SLIDING if (i + 1) % pattern else FULL for i in range(num_layers)]


def rope_settings(
    cfg: ModelConfig, local_separate: bool
) -> dict[str, tuple[float, dict[str, Any] | None]]:
    """(theta, scaling) per layer type. Gemma 2: the model's RoPE for both. Gemma 3: global
    layers rope_theta with its scaling, local ones rope_local_base_freq unscaled; read from
    transformers >= 5's per-type `rope_parameters` or the older flat fields."""
    if not local_separate:
        return {t: (cfg.rope_theta, cfg.rope_scaling) for t in (SLIDING, FULL)}
    hf = cfg.hf_config
    params = hf.get("rope_parameters") or {}
    if FULL in params:
        full = dict(params[FULL] or {})
        local = dict(params.get(SLIDING) or {})
    else:
        full = dict(hf.get("rope_scaling") or {})
        full["rope_theta"] = hf.get("rope_theta", 1_000_000.0)
        local = {"rope_theta": hf.get("rope_local_base_freq", 10_000.0)}
    out: dict[str, tuple[float, dict[str, Any] | None]] = {}
    for name, p in ((FULL, full), (SLIDING, local)):
        theta = float(p.pop("rope_theta", 10_000.0))
        out[name] = (theta, None if rope_type_of(p) == "default" else p)
    return out


class GemmaAttention(LlamaAttention):
    def __init__(
        self,
        cfg: ModelConfig,
        rotary: RotaryEmbedding,
        dtype: torch.dtype,
        quant: QuantScheme,
        sliding_window: int | None,
        qk_norm: bool,
    ) -> None:
        hf = cfg.hf_config
        super().__init__(
            cfg, rotary, dtype, quant, sliding_window,
            scale=float(hf.get("query_pre_attn_scalar", cfg.head_dim)) ** -0.5,
            softcap=hf.get("attn_logit_softcapping") or None,
        )  # fmt: skip
        # Gemma 3: per-head RMSNorm of q and k before RoPE
        self.q_norm = GemmaRMSNorm(self.head_dim, cfg.rms_norm_eps, dtype) if qk_norm else None
        self.k_norm = GemmaRMSNorm(self.head_dim, cfg.rms_norm_eps, dtype) if qk_norm else None

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, ctx: ForwardContext
    ) -> torch.Tensor:
        # Llama's projections, scale, window and cap; always the PyTorch RoPE (module docstring)
        num_tokens = x.shape[0]  # x: [T, hidden]
        q, k, v = self.qkv_proj(x).split(self.split, dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)  # [T, H, D]
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)  # [T, H_kv, D]
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(positions, q, k)
        out = self.attn(q, k, v, ctx)  # [T, H, D]
        return self.o_proj(out.reshape(num_tokens, -1))


class GemmaMLP(LlamaMLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # [T, inter] each
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)  # GeGLU


class GemmaDecoderLayer(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        rotary: RotaryEmbedding,
        dtype: torch.dtype,
        quant: QuantScheme,
        sliding_window: int | None,
        qk_norm: bool,
    ) -> None:
        super().__init__()
        hidden, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.self_attn = GemmaAttention(cfg, rotary, dtype, quant, sliding_window, qk_norm)
        self.mlp = GemmaMLP(cfg, dtype, quant)
        self.input_layernorm = GemmaRMSNorm(hidden, eps, dtype)
        self.post_attention_layernorm = GemmaRMSNorm(hidden, eps, dtype)
        self.pre_feedforward_layernorm = GemmaRMSNorm(hidden, eps, dtype)
        self.post_feedforward_layernorm = GemmaRMSNorm(hidden, eps, dtype)
        # the whole layer in one C++ call, if it can
        self.fused_decode = FusedDecodeLayer(self, offset_norms=True, activation="gelu_tanh")

    def forward(
        self,
        positions: torch.Tensor,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        ctx: ForwardContext,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual stream comes and goes in two parts [T, hidden], x + residual (residual
        None: x alone), as the fused op leaves it: the add is the next layer's first op."""
        fused = self.fused_decode(positions, x, residual, ctx)
        if fused is not None:
            return fused
        if residual is not None:
            x = x + residual
        h = self.self_attn(positions, self.input_layernorm(x), ctx)
        x = x + self.post_attention_layernorm(h)
        h = self.mlp(self.pre_feedforward_layernorm(x))
        return self.post_feedforward_layernorm(h), x


class GemmaModel(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        dtype: torch.dtype,
        max_positions: int,
        quant: QuantScheme,
        pattern: int,
        gemma3: bool,
    ) -> None:
        super().__init__()
        hf = cfg.hf_config
        if hf.get("use_bidirectional_attention"):
            raise ModelLoadError("Gemma with use_bidirectional_attention is not supported")
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        self.embed_tokens.weight.requires_grad_(False)
        # HF rounds the factor to the weights' dtype before multiplying
        self.embed_scale = float(torch.tensor(cfg.hidden_size**0.5, dtype=dtype))
        ropes = {
            t: RotaryEmbedding.from_config(cfg, max_positions, dtype, theta=theta, scaling=scaling)
            for t, (theta, scaling) in rope_settings(cfg, local_separate=gemma3).items()
        }
        window = hf.get("sliding_window")
        types = layer_types(hf, cfg.num_hidden_layers, pattern)
        self.layers = nn.ModuleList(
            GemmaDecoderLayer(
                cfg, ropes[t], dtype, quant, window if t == SLIDING else None, qk_norm=gemma3
            )
            for t in types
        )
        self.norm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids) * self.embed_scale  # [T, hidden]
        residual = None
        for layer in self.layers:
            x, residual = layer(positions, x, residual, ctx)
        return self.norm(x if residual is None else x + residual)


class _GemmaForCausalLM(nn.Module):
    _pattern: int  # every _pattern-th layer global when the config lists no layer_types
    _gemma3: bool

    def __init__(
        self,
        cfg: ModelConfig,
        dtype: torch.dtype,
        max_positions: int,
        quant: QuantScheme = None,
    ) -> None:
        super().__init__()
        self.config = cfg
        self.model = GemmaModel(cfg, dtype, max_positions, quant, self._pattern, self._gemma3)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, dtype=dtype, quant=quant)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.final_logit_softcapping = cfg.hf_config.get("final_logit_softcapping") or None

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext
    ) -> torch.Tensor:
        """Returns final hidden states [T, hidden]; call `compute_logits` on the rows needed."""
        return self.model(input_ids, positions, ctx)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden).float()  # [rows, vocab]
        cap = self.final_logit_softcapping
        if cap is not None:
            logits = cap * torch.tanh(logits / cap)
        return logits

    # HF names, q/k/v and gate/up routed into their fused matmuls, quantized weights handed to
    # their Linear: the same as Llama's loading, which reads only names and modules.
    _load_quantized = LlamaForCausalLM._load_quantized
    load_weights = LlamaForCausalLM.load_weights


class Gemma2ForCausalLM(_GemmaForCausalLM):
    _pattern = 2
    _gemma3 = False


class Gemma3ForCausalLM(_GemmaForCausalLM):
    _pattern = 6
    _gemma3 = True
