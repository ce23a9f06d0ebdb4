"""GGUF metadata as an HF config.json-style dict: llama.cpp's `{arch}.*` keys under HF names,
rope scaling recovered (from the llama3 frequency factors too)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from tokenmill.errors import ModelLoadError

if TYPE_CHECKING:
    from tokenmill.loader.gguf import GGUFFile

# GGUF `general.architecture` -> HF `architectures[0]`. Mistral GGUFs are written as "llama".
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    # Mixture of experts; Mixtral GGUFs are "llama" with `llama.expert_count` set.
    "qwen2moe": "Qwen2MoeForCausalLM",
    "qwen3moe": "Qwen3MoeForCausalLM",
    "olmoe": "OlmoeForCausalLM",
}
# Architectures one GGUF name covers besides its own (for --list-architectures).
ALSO_READ_AS = {"llama": "MixtralForCausalLM, with llama.expert_count set"}
# Whether llama.cpp renormalises the top-k routing weights, per architecture, where the file
# has no `{arch}.expert_weights_norm` (HF: always for Mixtral, else norm_topk_prob).
_EXPERT_WEIGHTS_NORM = {"llama": True, "qwen2moe": False, "qwen3moe": True, "olmoe": False}


def checked_architecture(f: GGUFFile) -> str:
    """The file's architecture; ModelLoadError if it is not one of SUPPORTED_ARCHITECTURES."""
    arch = f.architecture
    if arch not in SUPPORTED_ARCHITECTURES:
        supported = ", ".join(sorted(SUPPORTED_ARCHITECTURES))
        raise ModelLoadError(
            f"GGUF file {f.path}: architecture {arch!r} is not supported "
            f"(supported: {supported}; mistral GGUFs use 'llama')"
        )
    return arch


def hf_config(f: GGUFFile) -> dict[str, Any]:
    """An HF config.json-style dict (accepted by ModelConfig.from_hf_dict)."""
    arch = checked_architecture(f)
    g = lambda key, default=None: f.get(f"{arch}.{key}", default)  # noqa: E731
    required = ("block_count", "embedding_length", "feed_forward_length")
    missing = [f"{arch}.{k}" for k in (*required, "attention.head_count") if g(k) is None]
    if missing:
        raise ModelLoadError(f"GGUF file {f.path} lacks metadata: {', '.join(missing)}")
    hidden = int(g("embedding_length"))
    heads = int(g("attention.head_count"))
    head_dim = int(g("attention.key_length", hidden // heads))
    tokens = f.get("tokenizer.ggml.tokens")
    if f.has_tensor("token_embd.weight"):
        vocab_size = f.tensor_shape("token_embd.weight")[0]
    elif tokens is not None:
        vocab_size = len(tokens)
    else:
        vocab_size = int(g("vocab_size"))
    eos_ids: list[int] = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        tid = f.get(f"tokenizer.ggml.{key}")
        if tid is not None and int(tid) not in eos_ids:
            eos_ids.append(int(tid))
    cfg: dict[str, Any] = {
        "architectures": [SUPPORTED_ARCHITECTURES[arch]],
        "model_type": arch,
        "hidden_act": "silu",
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": int(g("feed_forward_length")),
        "num_hidden_layers": int(g("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(g("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "rms_norm_eps": _f32(g("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": _f32(g("rope.freq_base", 10000.0)),
        "rope_scaling": _rope_scaling(f, arch, int(g("rope.dimension_count", head_dim))),
        "max_position_embeddings": int(g("context_length", 2048)),
        "tie_word_embeddings": not f.has_tensor("output.weight"),
        "attention_bias": arch == "qwen2" or f.has_tensor("blk.0.attn_q.bias"),
        "bos_token_id": f.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": eos_ids[0] if len(eos_ids) == 1 else (eos_ids or None),
        "pad_token_id": f.get("tokenizer.ggml.padding_token_id"),
    }
    rope_dim = g("rope.dimension_count")
    if rope_dim is not None and int(rope_dim) != head_dim:
        cfg["partial_rotary_factor"] = int(rope_dim) / head_dim
    if arch == "qwen2":
        cfg["use_sliding_window"] = False
    if arch in ("gemma2", "gemma3"):
        cfg.update(_gemma_fields(f, arch, cfg))
    if arch == "phi3" and g("attention.sliding_window") is not None:
        cfg["sliding_window"] = int(g("attention.sliding_window"))
    if g("expert_count"):
        cfg.update(_moe_fields(f, arch, cfg))
    return cfg


def _moe_fields(f: GGUFFile, arch: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """The HF fields of a mixture-of-experts file. The experts' width is
    expert_feed_forward_length where given (Qwen-MoE; feed_forward_length is then the dense
    layers'), else feed_forward_length (Mixtral, OLMoE). Layers without a router tensor are
    dense (HF's mlp_only_layers)."""
    g = lambda key, default=None: f.get(f"{arch}.{key}", default)  # noqa: E731
    num_experts = int(g("expert_count"))
    layers = cfg["num_hidden_layers"]
    out: dict[str, Any] = {
        "num_experts": num_experts,
        "num_experts_per_tok": int(g("expert_used_count")),
        "moe_intermediate_size": int(g("expert_feed_forward_length", cfg["intermediate_size"])),
        "norm_topk_prob": bool(g("expert_weights_norm", _EXPERT_WEIGHTS_NORM[arch])),
        "mlp_only_layers": [
            i for i in range(layers) if not f.has_tensor(f"blk.{i}.ffn_gate_inp.weight")
        ],
    }
    if arch == "llama":  # Mixtral: the HF names of its config
        out["architectures"] = ["MixtralForCausalLM"]
        out["model_type"] = "mixtral"
        out["num_local_experts"] = num_experts
        out["intermediate_size"] = out["moe_intermediate_size"]
    if arch == "qwen2moe":
        out["qkv_bias"] = cfg["attention_bias"]
        shared = g("expert_shared_feed_forward_length")
        if shared is None and f.has_tensor("blk.0.ffn_gate_shexp.weight"):
            shared = f.tensor_shape("blk.0.ffn_gate_shexp.weight")[0]
        out["shared_expert_intermediate_size"] = None if shared is None else int(shared)
    if arch == "olmoe" and g("attention.clamp_kqv") is not None:
        out["clip_qkv"] = _f32(g("attention.clamp_kqv"))
    return out


def _gemma_fields(f: GGUFFile, arch: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """Gemma's own HF fields. llama.cpp stores no query_pre_attn_scalar: like llama.cpp, the
    27B models (46 layers for Gemma 2, 62 for Gemma 3) scale by hidden / heads, the others by
    head_dim. Gemma 3's local layers use RoPE base 10000 (llama.cpp's fixed value); its
    layer pattern is the file's sliding_window_pattern (a period, or one bool per layer),
    else one global layer in 6 (Gemma 2: alternating)."""
    g = lambda key, default=None: f.get(f"{arch}.{key}", default)  # noqa: E731
    layers, heads = cfg["num_hidden_layers"], cfg["num_attention_heads"]
    big = layers == (46 if arch == "gemma2" else 62)
    out: dict[str, Any] = {
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": cfg["hidden_size"] // heads if big else cfg["head_dim"],
        "sliding_window": g("attention.sliding_window"),
        "attn_logit_softcapping": g("attn_logit_softcapping"),
        "final_logit_softcapping": g("final_logit_softcapping"),
    }
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if out[key] is not None:
            out[key] = _f32(out[key])
    pattern = g("attention.sliding_window_pattern")
    if isinstance(pattern, list | tuple | np.ndarray):
        out["layer_types"] = [
            "sliding_attention" if bool(p) else "full_attention" for p in list(pattern)[:layers]
        ]
    else:
        period = int(pattern) if pattern is not None else (2 if arch == "gemma2" else 6)
        out["layer_types"] = [
            "sliding_attention" if (i + 1) % period else "full_attention" for i in range(layers)
        ]
    if arch == "gemma3":
        out["rope_local_base_freq"] = 10000.0
    return out


def _rope_scaling(f: GGUFFile, arch: str, rope_dim: int) -> dict[str, Any] | None:
    if f.has_tensor("rope_factors_long.weight"):
        return _longrope_scaling(f, arch)
    kind = f.get(f"{arch}.rope.scaling.type")
    if kind is None and f.has_tensor("rope_freqs.weight"):
        return _llama3_rope_scaling(f, rope_dim, _f32(f.get(f"{arch}.rope.freq_base", 10000.0)))
    factor = f.get(f"{arch}.rope.scaling.factor")
    if kind is None and f.get(f"{arch}.rope.scale_linear") is not None:
        kind, factor = "linear", f.get(f"{arch}.rope.scale_linear")
    if kind in (None, "none") or factor is None or (kind == "linear" and factor == 1.0):
        return None
    scaling: dict[str, Any] = {"rope_type": kind, "type": kind, "factor": _f32(factor)}
    return _with_scaling_extras(f, arch, scaling)


def _with_scaling_extras(f: GGUFFile, arch: str, scaling: dict[str, Any]) -> dict[str, Any]:
    """`scaling` plus the original context length and attention factor the GGUF records."""
    orig = f.get(f"{arch}.rope.scaling.original_context_length")
    if orig is not None:
        scaling["original_max_position_embeddings"] = int(orig)
    attn_factor = f.get(f"{arch}.rope.scaling.attn_factor")
    if attn_factor is not None:
        scaling["attention_factor"] = _f32(attn_factor)
    return scaling


def _longrope_scaling(f: GGUFFile, arch: str) -> dict[str, Any]:
    """Phi-3 long-context GGUFs store HF's longrope factor lists as two tensors."""
    scaling: dict[str, Any] = {
        "rope_type": "longrope",
        "type": "longrope",
        "long_factor": [_f32(x) for x in f.read_tensor("rope_factors_long.weight").tolist()],
        "short_factor": [_f32(x) for x in f.read_tensor("rope_factors_short.weight").tolist()],
    }
    return _with_scaling_extras(f, arch, scaling)


def _llama3_rope_scaling(f: GGUFFile, rope_dim: int, theta: float) -> dict[str, Any]:
    """Llama 3.1+ GGUFs store rope scaling as per-frequency factors (rope_freqs.weight):
    recover the HF "llama3" parameters that give them (llama.cpp converter's formula)."""
    got = f.read_tensor("rope_freqs.weight").double()
    factor, low, high, old = _f32(got.max()), 1.0, 4.0, 8192  # every Llama 3.x release
    inv_freq = theta ** -(torch.arange(0, rope_dim, 2, dtype=torch.float64) / rope_dim)
    wavelen = 2 * math.pi / inv_freq
    smooth = (old / wavelen - low) / (high - low)
    want = torch.where(wavelen > old / low, factor, 1 / ((1 - smooth) / factor + smooth))
    want = torch.where(wavelen < old / high, 1.0, want)
    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4):
        raise ModelLoadError(
            f"GGUF file {f.path}: rope_freqs.weight does not match llama3 rope scaling "
            f"(factor {factor}, low/high freq factor 1/4, original context 8192)"
        )
    return {
        "rope_type": "llama3",
        "type": "llama3",
        "factor": factor,
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": old,
    }


def _f32(value: Any) -> float:
    """A float32 metadata value as the decimal it was written from (9.99999975e-06 -> 1e-05)."""
    return float(str(np.float32(value)))
