"""Rotary position embeddings (rotate-half layout as in HF Llama) with every RoPE scaling type
transformers uses: default, linear, dynamic (NTK), yarn, llama3 and longrope ("su" in older
Phi-3 configs), plus partial rotary (only the first `rotary_dim` dims of a head are rotated).

The inverse frequencies and the attention scaling (yarn's mscale, longrope's factor; transformers
multiplies cos and sin by it) follow transformers' `ROPE_INIT_FUNCTIONS` formula by formula,
in the same fp32 order of operations, and cos/sin are precomputed once for every position of
the engine's context (`max_positions`) in fp32, scaled, then cast to the activation dtype.

Two types recompute their frequencies per forward in transformers, from the longest position of
that forward. A paged engine shares one table across all requests and their KV cache, so the
choice is made once, from the engine's context:
- `longrope` uses the long factors when `max_positions` exceeds
  `original_max_position_embeddings`, else the short ones (llama.cpp's rule). transformers
  agrees whenever a prompt is as long as that decision (longer than the original max with a
  longer context, or any prompt with a context within it).
- `dynamic` (NTK) fixes the scaled base for `max_positions` when it exceeds the model's
  `max_position_embeddings` (vLLM's rule), and equals `default` otherwise, as transformers does
  for sequences within the original max.
"""

from __future__ import annotations

import math
from types import EllipsisType
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from tokenmill.config import ModelConfig

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "longrope")
# Older spellings of a type, as config.json files still carry them.
_ROPE_TYPE_ALIASES = {"su": "longrope"}


def rope_type_of(scaling: dict[str, Any] | None) -> str:
    """The canonical rope type of a `rope_scaling`/`rope_parameters` dict (None: default)."""
    if not scaling:
        return "default"
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    return _ROPE_TYPE_ALIASES.get(rope_type, rope_type)


def rope_parameters(
    rotary_dim: int,
    theta: float,
    scaling: dict[str, Any] | None,
    *,
    max_positions: int | None = None,
    max_position_embeddings: int | None = None,
    original_max_position_embeddings: int | None = None,
) -> tuple[torch.Tensor, float]:
    """(inv_freq [rotary_dim / 2], attention scaling) for a rope type, as transformers computes
    them for the same config.

    max_positions: the engine's context, which decides longrope's factors and dynamic's base.
    max_position_embeddings: the model config's; dynamic's original length and the default
    `factor` of yarn and longrope (its ratio to the original max). Defaults to max_positions.
    original_max_position_embeddings: overrides the one in `scaling` (Phi-3 keeps it at the
    top level of its config, and transformers lets that one win).
    """
    rope_type = rope_type_of(scaling)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"rope_scaling type {rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}"
        )
    scaling = scaling or {}
    model_max = max_position_embeddings or max_positions
    orig_max = original_max_position_embeddings or scaling.get("original_max_position_embeddings")
    if rope_type in ("yarn", "llama3", "longrope") and orig_max is None:
        orig_max = model_max  # transformers' standardization fills it in the same way
    if rope_type == "default":
        return _default_inv_freq(rotary_dim, theta), 1.0
    if rope_type == "linear":
        return _default_inv_freq(rotary_dim, theta) / scaling["factor"], 1.0
    if rope_type == "llama3":
        return _llama3_inv_freq(_default_inv_freq(rotary_dim, theta), scaling, orig_max), 1.0
    if rope_type == "dynamic":
        return _dynamic_inv_freq(rotary_dim, theta, scaling, max_positions, model_max), 1.0
    if rope_type == "yarn":
        return _yarn_parameters(rotary_dim, theta, scaling, model_max, orig_max)
    return _longrope_parameters(rotary_dim, theta, scaling, max_positions, model_max, orig_max)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """The inverse frequencies alone (see `rope_parameters`), for a context of the model's own
    length (the original max of the types that need one)."""
    return rope_parameters(head_dim, theta, scaling)[0]


def _default_inv_freq(dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any], old_len: int) -> torch.Tensor:
    # Llama 3.1: long wavelengths are divided by `factor`, short ones kept, smooth in between.
    factor = scaling["factor"]
    low_freq_factor = scaling.get("low_freq_factor", 1.0)
    high_freq_factor = scaling.get("high_freq_factor", 4.0)
    low_freq_wavelen = old_len / low_freq_factor
    high_freq_wavelen = old_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _dynamic_inv_freq(
    dim: int,
    theta: float,
    scaling: dict[str, Any],
    max_positions: int | None,
    model_max: int | None,
) -> torch.Tensor:
    # NTK-aware: the base grows with the context beyond the original length. transformers
    # recomputes it per forward from the longest sequence; here it is fixed for the context.
    if max_positions is None or model_max is None or max_positions <= model_max:
        return _default_inv_freq(dim, theta)
    factor = scaling["factor"]
    base = theta * ((factor * max_positions / model_max) - (factor - 1)) ** (dim / (dim - 2))
    return _default_inv_freq(dim, base)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature: 0.1 * mscale * ln(scale) + 1 (1 for scale <= 1)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _yarn_parameters(
    dim: int,
    theta: float,
    scaling: dict[str, Any],
    model_max: int | None,
    orig_max: int,
) -> tuple[torch.Tensor, float]:
    factor = scaling.get("factor")
    if factor is None:  # DeepSeek-V3 style: the ratio of the two lengths
        assert model_max is not None, "yarn without `factor` needs max_position_embeddings"
        factor = model_max / orig_max
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = float(
                yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
            )
        else:
            attention_factor = yarn_mscale(factor)
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1
    truncate = scaling.get("truncate", True)

    def correction_dim(num_rotations: float) -> float:
        # the dimension whose wavelength makes `num_rotations` turns over the original length
        return (dim * math.log(orig_max / (num_rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no singular ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2).float() / dim)
    inv_freq_extrapolation = 1.0 / pos_freqs
    inv_freq_interpolation = 1.0 / (factor * pos_freqs)
    # high frequencies (below `low`) extrapolate, low ones (above `high`) interpolate
    extrapolation = 1 - ramp
    inv_freq = inv_freq_interpolation * (1 - extrapolation) + inv_freq_extrapolation * extrapolation
    return inv_freq, attention_factor


def _longrope_parameters(
    dim: int,
    theta: float,
    scaling: dict[str, Any],
    max_positions: int | None,
    model_max: int | None,
    orig_max: int,
) -> tuple[torch.Tensor, float]:
    factor = scaling.get("factor")
    if factor is None:  # Phi-3: the ratio of the extended to the pretraining length
        assert model_max is not None, "longrope without `factor` needs max_position_embeddings"
        factor = model_max / orig_max
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        if factor <= 1.0:
            attention_factor = 1.0
        else:
            attention_factor = math.sqrt(1 + math.log(factor) / math.log(orig_max))
    # Chosen once for the engine's context (see the module docstring).
    long = max_positions is not None and max_positions > orig_max
    ext_factors = torch.tensor(
        scaling["long_factor" if long else "short_factor"], dtype=torch.float32
    )
    if ext_factors.numel() != dim // 2:
        raise ValueError(
            f"longrope {'long' if long else 'short'}_factor has {ext_factors.numel()} entries, "
            f"expected rotary_dim / 2 = {dim // 2}"
        )
    inv_freq_shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    return 1.0 / (ext_factors * theta**inv_freq_shape), attention_factor


def partial_rotary_factor(cfg: ModelConfig) -> float:
    """The fraction of each head that is rotated: from `rope_parameters` (transformers 5 puts it
    there and lets it win) or the top level of the HF config (Phi-4-mini: 0.75); 1 when absent."""
    hf = cfg.hf_config
    for params in (cfg.rope_scaling, hf.get("rope_parameters"), hf.get("rope_scaling")):
        if isinstance(params, dict) and params.get("partial_rotary_factor") is not None:
            return float(params["partial_rotary_factor"])
    return float(hf.get("partial_rotary_factor") or 1.0)


class RotaryEmbedding(nn.Module):
    """cos/sin tables [max_positions, rotary_dim] (already multiplied by the attention scaling)
    and their application to q and k. Positions past max_positions are out of range."""

    def __init__(
        self,
        head_dim: int,
        max_positions: int,
        theta: float,
        scaling: dict[str, Any] | None,
        dtype: torch.dtype,
        rotary_dim: int | None = None,
        max_position_embeddings: int | None = None,
        original_max_position_embeddings: int | None = None,
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.rotary_dim = head_dim if rotary_dim is None else rotary_dim
        if self.rotary_dim % 2 or not 0 < self.rotary_dim <= head_dim:
            raise ValueError(f"rotary_dim must be even and in (0, {head_dim}], got {rotary_dim}")
        inv_freq, self.attention_scaling = rope_parameters(
            self.rotary_dim,
            theta,
            scaling,
            max_positions=max_positions,
            max_position_embeddings=max_position_embeddings,
            original_max_position_embeddings=original_max_position_embeddings,
        )  # [rotary_dim / 2]
        t = torch.arange(max_positions, dtype=torch.int64).float()
        freqs = torch.outer(t, inv_freq)  # [max_positions, rotary_dim / 2]
        emb = torch.cat([freqs, freqs], dim=-1)  # [max_positions, rotary_dim]
        # HF computes cos/sin in fp32, scales them and casts them to the activation dtype.
        cos, sin = emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling
        self.register_buffer("cos", cos.to(dtype), persistent=False)
        self.register_buffer("sin", sin.to(dtype), persistent=False)

    @classmethod
    def from_config(
        cls,
        cfg: ModelConfig,
        max_positions: int,
        dtype: torch.dtype,
        theta: float | None = None,
        scaling: dict[str, Any] | None | EllipsisType = ...,
    ) -> RotaryEmbedding:
        """The model's rotary embedding for an engine context of max_positions. theta and
        scaling override the config's (`...`: the config's), e.g. for local attention layers
        with their own base and no scaling."""
        rope_scaling = cfg.rope_scaling if scaling is ... else scaling
        rope_type = rope_type_of(rope_scaling)
        if rope_type == "yarn" and cfg.hf_config.get("model_type") == "phi3":
            # older Phi-3 configs name their long/short factors "yarn" (transformers' Phi3Config
            # reads them as longrope)
            rope_type, rope_scaling = "longrope", {**(rope_scaling or {}), "rope_type": "longrope"}
        # transformers lets a top-level original max (Phi-3) win for these types.
        top_orig = cfg.hf_config.get("original_max_position_embeddings")
        orig = top_orig if rope_type in ("llama3", "yarn", "longrope") else None
        return cls(
            cfg.head_dim,
            max_positions,
            cfg.rope_theta if theta is None else theta,
            rope_scaling,
            dtype,
            rotary_dim=int(cfg.head_dim * partial_rotary_factor(cfg)),
            max_position_embeddings=cfg.max_position_embeddings,
            original_max_position_embeddings=orig,
        )

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: [T]; q: [T, H, D]; k: [T, H_kv, D]
        cos = self.cos[positions].unsqueeze(1)  # [T, 1, rotary_dim]
        sin = self.sin[positions].unsqueeze(1)
        if self.rotary_dim == self.head_dim:
            return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        return _rotate_partial(q, cos, sin), _rotate_partial(k, cos, sin)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rotate_partial(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # the first rotary_dim dims are rotated (rotate-half within them), the rest pass through
    rotary_dim = cos.shape[-1]
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    return torch.cat((x_rot * cos + _rotate_half(x_rot) * sin, x_pass), dim=-1)
