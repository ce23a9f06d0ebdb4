"""Logit parity with transformers' own implementation on tiny random-weight models (fp32)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from tokenmill.config import ModelConfig
from tokenmill.layers.attn_backends.sdpa import SdpaBackend
from tokenmill.layers.attn_backends.unified import UnifiedRefBackend
from tokenmill.models.registry import build_model
from tokenmill.testing.parity import (
    assert_prefill_matches_hf,
    bind_kv_cache,
    hf_logits,
)

transformers = pytest.importorskip("transformers")

BLOCK = 4

TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
)

CONFIGS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=False)),
    "llama3-rope-tied": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            tie_word_embeddings=True,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
    ),
    "linear-rope": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(rope_scaling={"rope_type": "linear", "factor": 4.0}),
    ),
    # our context (256) is the model's max, within which transformers' dynamic NTK is unscaled
    "dynamic-rope": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
    ),
    "yarn-rope": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            rope_scaling={
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        ),
    ),
    # original max 6: every prompt (and our context) is longer, so both take the long factors
    "longrope-long": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            rope_scaling={
                "rope_type": "longrope",
                "short_factor": [1.0 + 0.5 * i for i in range(8)],
                "long_factor": [1.0 + 3.0 * i for i in range(8)],
                "original_max_position_embeddings": 6,
            }
        ),
    ),
    # original max = our context: both take the short factors, scaled by factor's attention
    "longrope-short": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            rope_scaling={
                "rope_type": "longrope",
                "factor": 4.0,
                "short_factor": [1.0 + 0.5 * i for i in range(8)],
                "long_factor": [1.0 + 3.0 * i for i in range(8)],
                "original_max_position_embeddings": 256,
            }
        ),
    ),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None)),
}


def make_hf(name: str):
    cfg_cls, model_cls, extra = CONFIGS[name]
    torch.manual_seed(0)
    cfg = getattr(transformers, cfg_cls)(**TINY, **extra)
    cfg.architectures = [model_cls]
    hf = getattr(transformers, model_cls)(cfg).eval()
    if name == "qwen2":  # random q/k/v biases, so the bias path is really tested
        for layer in hf.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
    return cfg, hf


def make_ours(cfg, hf):
    mcfg = ModelConfig.from_hf_dict(cfg.to_dict())
    model = build_model(mcfg, torch.float32, 256)
    model.load_weights(hf.state_dict().items())
    bind_kv_cache(model, mcfg, BLOCK)
    return model


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("chunk", [1000, 5, 1])
def test_logits_match_transformers(name: str, chunk: int) -> None:
    cfg, hf = make_hf(name)
    model = make_ours(cfg, hf)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (23, 7, 40)]
    # all prompts together, `chunk` tokens of each per step, each in 16 blocks of its own
    assert_prefill_matches_hf(model, hf, prompts, BLOCK, chunk)


WINDOWED = {
    # every layer windowed
    "mistral-window8": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=8)),
    # layer 0 global, layer 1 windowed (max_window_layers=1)
    "qwen2-window6": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        dict(use_sliding_window=True, sliding_window=6, max_window_layers=1),
    ),
}


@pytest.mark.parametrize("backend", ["sdpa", "unified-ref"])
@pytest.mark.parametrize("chunk", [1000, 5, 1])
@pytest.mark.parametrize("name", list(WINDOWED))
def test_sliding_window_logits_match_transformers(name: str, chunk: int, backend: str) -> None:
    """Prompts of 3-4 windows, chunked through the paged cache: every position past the window
    attends to its last `window` keys only, as in transformers."""
    cfg_cls, model_cls, extra = WINDOWED[name]
    torch.manual_seed(0)
    cfg = getattr(transformers, cfg_cls)(**TINY, **extra)
    cfg.architectures = [model_cls]
    hf = getattr(transformers, model_cls)(cfg).eval()
    mcfg = ModelConfig.from_hf_dict(cfg.to_dict())
    model = build_model(mcfg, torch.float32, 256)
    model.load_weights(hf.state_dict().items())
    windows = [layer.self_attn.attn.sliding_window for layer in model.model.layers]
    assert windows == ([8, 8] if name.startswith("mistral") else [None, 6])
    bind_kv_cache(model, mcfg, BLOCK, SdpaBackend() if backend == "sdpa" else UnifiedRefBackend())
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (30, 9, 26)]
    assert_prefill_matches_hf(model, hf, prompts, BLOCK, chunk)
    # the window really cut something: without it the last position's logits differ
    full = getattr(transformers, cfg_cls)(**TINY)
    full.architectures = [model_cls]
    unwindowed = getattr(transformers, model_cls)(full).eval()
    unwindowed.load_state_dict(hf.state_dict())
    last_full = hf_logits(unwindowed, prompts[0])[-1]
    assert (last_full - hf_logits(hf, prompts[0])[-1]).abs().max() > 1e-3


def make_phi3(partial: float, rope_type: str | None, dtype: torch.dtype):
    """transformers' Phi-3 (partial rotary, Phi-4-mini style) and the same weights in our Llama
    decoder: Phi-3 is Llama with fused qkv_proj and gate_up_proj tensors, split here."""
    rotary_dim = int(16 * partial)  # head_dim 16
    scaling = None
    if rope_type is not None:  # original max 6 (top level, as Phi-3 keeps it): long factors
        n = rotary_dim // 2
        scaling = {
            "type": rope_type,
            "short_factor": [1.0 + 0.5 * i for i in range(n)],
            "long_factor": [1.0 + 3.0 * i for i in range(n)],
        }
    torch.manual_seed(0)
    cfg = transformers.Phi3Config(
        **TINY,
        partial_rotary_factor=partial,
        original_max_position_embeddings=6,
        rope_scaling=scaling,
        pad_token_id=0,
    )
    hf = transformers.Phi3ForCausalLM(cfg).eval()
    mcfg = replace(ModelConfig.from_hf_dict(cfg.to_dict()), architecture="LlamaForCausalLM")
    model = build_model(mcfg, dtype, 256)
    q_size, kv_size = 4 * 16, 2 * 16
    weights = []
    for name, tensor in hf.state_dict().items():
        if name.endswith("qkv_proj.weight"):
            base = name.removesuffix("qkv_proj.weight")
            parts = tensor.split([q_size, kv_size, kv_size])
            weights += [(f"{base}{p}_proj.weight", t) for p, t in zip("qkv", parts, strict=True)]
        elif name.endswith("gate_up_proj.weight"):
            base = name.removesuffix("gate_up_proj.weight")
            gate, up = tensor.chunk(2)  # Phi-3: up_states * act(gate), gate first
            weights += [(f"{base}gate_proj.weight", gate), (f"{base}up_proj.weight", up)]
        else:
            weights.append((name, tensor))
    model.load_weights((n, t.to(dtype)) for n, t in weights)
    bind_kv_cache(model, mcfg, BLOCK, dtype=dtype)
    return hf, model


@pytest.mark.parametrize(
    ("partial", "rope_type"), [(0.5, None), (0.75, "longrope"), (0.75, "su"), (1.0, "longrope")]
)
@pytest.mark.parametrize("chunk", [1000, 5])
def test_partial_rotary_logits_match_transformers_phi3(
    partial: float, rope_type: str | None, chunk: int
) -> None:
    hf, model = make_phi3(partial, rope_type, torch.float32)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (23, 7, 40)]
    assert_prefill_matches_hf(model, hf, prompts, BLOCK, chunk)
