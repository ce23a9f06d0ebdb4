"""RoPE scaling types and partial rotary against transformers' own formulas (CPU, fp32)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tokenmill.config import ModelConfig
from tokenmill.layers.rotary import RotaryEmbedding, rope_parameters

transformers = pytest.importorskip("transformers")
rope_utils = pytest.importorskip("transformers.modeling_rope_utils")

HEAD_DIM = 16
MAX_POS = 256  # the model's max_position_embeddings
SHORT = [1.0 + 0.25 * i for i in range(HEAD_DIM // 2)]
LONG = [2.0 + 1.5 * i for i in range(HEAD_DIM // 2)]

# name -> rope_parameters (without rope_theta); max_position_embeddings is MAX_POS
ROPES: dict[str, dict[str, Any]] = {
    "default": {"rope_type": "default"},
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    "yarn-mscale": {
        "rope_type": "yarn",
        "factor": 40.0,
        "mscale": 1.0,
        "mscale_all_dim": 0.707,
        "beta_fast": 16,
        "beta_slow": 2,
        "original_max_position_embeddings": 32,
    },
    "yarn-attention-factor-no-truncate": {
        "rope_type": "yarn",
        "factor": 4.0,
        "attention_factor": 1.3,
        "truncate": False,
        "original_max_position_embeddings": 64,
    },
    "longrope": {
        "rope_type": "longrope",
        "short_factor": SHORT,
        "long_factor": LONG,
        "original_max_position_embeddings": 64,
    },
    "longrope-factor": {
        "rope_type": "longrope",
        "factor": 8.0,
        "short_factor": SHORT,
        "long_factor": LONG,
        "original_max_position_embeddings": 64,
    },
}


def llama_config(rope: dict[str, Any], theta: float = 10000.0) -> Any:
    return transformers.LlamaConfig(
        vocab_size=32,
        hidden_size=HEAD_DIM * 4,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_POS,
        rope_parameters={**rope, "rope_theta": theta},
    )


def hf_init(cfg: Any, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    rope_type = cfg.rope_parameters["rope_type"]
    if rope_type == "default":
        rotary_cls = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding
        return rotary_cls.compute_default_rope_parameters(cfg)
    return rope_utils.ROPE_INIT_FUNCTIONS[rope_type](cfg, "cpu", seq_len=seq_len)


def hf_cos_sin(rotary_cls: Any, cfg: Any, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """transformers' cos/sin [len(positions), rotary_dim] for one forward at these positions
    (its dynamic types decide from their largest position)."""
    module = rotary_cls(cfg)
    x = torch.zeros(1, dtype=torch.float32)
    cos, sin = module(x, positions[None])
    return cos[0], sin[0]


def ours_from(cfg: Any, max_positions: int) -> RotaryEmbedding:
    mcfg = ModelConfig.from_hf_dict(cfg.to_dict())
    return RotaryEmbedding.from_config(mcfg, max_positions, torch.float32)


@pytest.mark.parametrize("name", list(ROPES))
def test_inv_freq_and_scaling_match_transformers(name: str) -> None:
    cfg = llama_config(ROPES[name], theta=500000.0 if name == "llama3" else 10000.0)
    ref_inv, ref_scale = hf_init(cfg)
    # a context within the model's length: dynamic is unscaled, longrope takes its short factors
    ours = ours_from(cfg, MAX_POS if not name.startswith("longrope") else 64)
    inv, scale = rope_parameters(
        HEAD_DIM,
        cfg.rope_parameters["rope_theta"],
        dict(cfg.rope_parameters),
        max_positions=64 if name.startswith("longrope") else MAX_POS,
        max_position_embeddings=MAX_POS,
    )
    torch.testing.assert_close(inv, ref_inv, atol=0, rtol=0)
    assert scale == pytest.approx(ref_scale, rel=1e-12)
    assert ours.attention_scaling == pytest.approx(ref_scale, rel=1e-12)
    # a scaling type really changes the frequencies or the scale (dynamic only past the
    # original max: test_dynamic_base_is_fixed_for_the_context)
    if name not in ("default", "dynamic"):
        default_inv, _ = hf_init(llama_config(ROPES["default"]))
        assert not torch.equal(inv, default_inv) or scale != 1.0


@pytest.mark.parametrize("name", list(ROPES))
def test_cos_sin_match_transformers_rotary_module(name: str) -> None:
    cfg = llama_config(ROPES[name], theta=500000.0 if name == "llama3" else 10000.0)
    rotary_cls = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding
    # longrope: a context above the original max and a forward that reaches past it, so both
    # sides take the long factors; dynamic: positions within the original max
    positions = torch.tensor([0, 1, 5, 17, 63, 64, 100, 200, 255])
    ours = ours_from(cfg, MAX_POS)
    cos, sin = hf_cos_sin(rotary_cls, cfg, positions)
    torch.testing.assert_close(ours.cos[positions], cos, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ours.sin[positions], sin, atol=1e-6, rtol=1e-6)


def test_longrope_short_factors_within_the_original_context() -> None:
    cfg = llama_config(ROPES["longrope"])
    rotary_cls = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding
    positions = torch.tensor([0, 3, 31, 63])  # transformers: short factors (max + 1 <= 64)
    ours = ours_from(cfg, 64)  # our context within the original max: short factors too
    cos, sin = hf_cos_sin(rotary_cls, cfg, positions)
    torch.testing.assert_close(ours.cos[positions], cos, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ours.sin[positions], sin, atol=1e-6, rtol=1e-6)
    long_ctx = ours_from(cfg, MAX_POS)  # a longer context switches every position to long
    assert not torch.allclose(long_ctx.cos[positions], cos)


@pytest.mark.parametrize("context", [300, 1024])
def test_dynamic_base_is_fixed_for_the_context(context: int) -> None:
    cfg = llama_config(ROPES["dynamic"])
    ref_inv, ref_scale = hf_init(cfg, seq_len=context)
    factor, dim, theta = 2.0, HEAD_DIM, 10000.0
    base = theta * ((factor * context / MAX_POS) - (factor - 1)) ** (dim / (dim - 2))
    expected = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
    ours = ours_from(cfg, context)
    inv, scale = rope_parameters(
        dim, theta, ROPES["dynamic"], max_positions=context, max_position_embeddings=MAX_POS
    )
    torch.testing.assert_close(inv, ref_inv, atol=0, rtol=0)
    torch.testing.assert_close(inv, expected, atol=0, rtol=1e-6)
    assert scale == ref_scale == ours.attention_scaling == 1.0
    # transformers scales the base by the forward's longest sequence; ours by the context, so
    # the two agree on a forward that reaches the end of the context, up to transformers'
    # forward computing the base from a tensor seq_len in fp32 instead of a Python float (an
    # ulp in inv_freq, which angles of a few hundred radians turn into ~1e-5 in cos/sin)
    positions = torch.tensor([0, 7, 100, context - 1])
    module = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(cfg)
    cos, sin = module(torch.zeros(1), positions[None])
    torch.testing.assert_close(module.inv_freq, inv, atol=0, rtol=1e-6)
    torch.testing.assert_close(ours.cos[positions], cos[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(ours.sin[positions], sin[0], atol=1e-4, rtol=0)
    # and it differs from the unscaled default
    assert not torch.allclose(inv, hf_init(llama_config(ROPES["default"]))[0])


def phi3_config(partial: float, rope_scaling: dict[str, Any] | None) -> Any:
    return transformers.Phi3Config(
        vocab_size=32,
        hidden_size=HEAD_DIM * 4,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_POS,
        original_max_position_embeddings=32,  # top level, as Phi-3 configs keep it
        partial_rotary_factor=partial,
        rope_scaling=rope_scaling,
        pad_token_id=0,
    )


@pytest.mark.parametrize(
    ("partial", "rope_type"), [(0.5, None), (0.75, "su"), (0.75, "longrope"), (1.0, "longrope")]
)
def test_partial_rotary_matches_transformers_phi3(partial: float, rope_type: str | None) -> None:
    rotary_dim = int(HEAD_DIM * partial)
    scaling = None
    if rope_type is not None:  # Phi-4-mini: longrope and a partial factor of 0.75
        n = rotary_dim // 2
        scaling = {"type": rope_type, "short_factor": SHORT[:n], "long_factor": LONG[:n]}
    cfg = phi3_config(partial, scaling)
    phi3 = transformers.models.phi3.modeling_phi3
    ours = ours_from(cfg, MAX_POS)
    assert ours.rotary_dim == rotary_dim
    positions = torch.tensor([0, 1, 9, 31, 32, 77, 255])
    cos, sin = hf_cos_sin(phi3.Phi3RotaryEmbedding, cfg, positions)
    assert cos.shape[-1] == rotary_dim
    torch.testing.assert_close(ours.cos[positions], cos, atol=1e-6, rtol=1e-6)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(len(positions), 4, HEAD_DIM, generator=g)  # [T, H, D]
    k = torch.randn(len(positions), 2, HEAD_DIM, generator=g)
    # transformers' layout: [B, H, T, D] with cos/sin [B, T, rotary_dim]
    ref_q, ref_k = phi3.apply_rotary_pos_emb(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[None], sin[None]
    )
    got_q, got_k = ours(positions, q, k)
    torch.testing.assert_close(got_q, ref_q[0].transpose(0, 1), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got_k, ref_k[0].transpose(0, 1), atol=1e-6, rtol=1e-6)
    if partial < 1.0:  # the dims past rotary_dim pass through untouched
        assert torch.equal(got_q[..., rotary_dim:], q[..., rotary_dim:])


@pytest.mark.parametrize("old_type", ["su", "yarn"])
def test_phi3_config_json_old_longrope_names(old_type: str) -> None:
    # a config.json as older Phi-3 checkpoints ship it: rope_scaling {"type": "su" | "yarn"}
    n = 6
    factors = {"short_factor": SHORT[:n], "long_factor": LONG[:n]}
    cfg = phi3_config(0.75, {"type": old_type, **factors})
    hf = cfg.to_dict()
    hf.pop("rope_parameters")
    hf.update(rope_scaling={"type": old_type, **factors}, rope_theta=10000.0)
    ours = RotaryEmbedding.from_config(ModelConfig.from_hf_dict(hf), MAX_POS, torch.float32)
    positions = torch.tensor([0, 40, 255])
    phi3 = transformers.models.phi3.modeling_phi3
    cos, sin = hf_cos_sin(phi3.Phi3RotaryEmbedding, cfg, positions)
    torch.testing.assert_close(ours.cos[positions], cos, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ours.sin[positions], sin, atol=1e-6, rtol=1e-6)


def test_partial_rotary_factor_read_from_rope_parameters() -> None:
    # transformers 5 keeps it inside rope_parameters, even with the default type
    hf = llama_config(ROPES["default"]).to_dict()
    hf["rope_parameters"]["partial_rotary_factor"] = 0.5
    ours = RotaryEmbedding.from_config(ModelConfig.from_hf_dict(hf), 32, torch.float32)
    assert ours.rotary_dim == HEAD_DIM // 2
    assert ours.cos.shape == (32, HEAD_DIM // 2)


def test_from_config_overrides_theta_and_scaling() -> None:
    mcfg = ModelConfig.from_hf_dict(llama_config(ROPES["linear"]).to_dict())
    local = RotaryEmbedding.from_config(mcfg, 64, torch.float32, theta=500.0, scaling=None)
    plain = RotaryEmbedding(HEAD_DIM, 64, 500.0, None, torch.float32)
    assert torch.equal(local.cos, plain.cos) and torch.equal(local.sin, plain.sin)
    scaled = RotaryEmbedding.from_config(mcfg, 64, torch.float32)
    assert not torch.equal(scaled.cos, plain.cos)


def test_unknown_rope_type_names_the_supported_ones() -> None:
    with pytest.raises(ValueError, match=r"'mrope'.*longrope"):
        RotaryEmbedding(HEAD_DIM, 8, 10000.0, {"rope_type": "mrope"}, torch.float32)


def test_bf16_partial_rotary_declines_the_fused_cpu_ops(tmp_path, monkeypatch) -> None:
    """The fused C++ RoPE (rope_cache, and the whole-layer decode of packed int4 weights)
    rotates whole heads: with partial rotary the model takes its PyTorch path instead, and
    decodes the same tokens as with the fused ops off."""
    from tokenmill import LLM, SamplingParams
    from tokenmill.kernels.cpu_fused import load_cpu_fused
    from utils_tiny import make_tiny_hf_folder

    if load_cpu_fused() is None:
        pytest.skip("the fused CPU ops cannot be built here")
    folder = make_tiny_hf_folder(
        tmp_path, hidden_size=256, intermediate_size=512, partial_rotary_factor=0.5
    )
    kwargs = dict(
        model=str(folder),
        dtype="bfloat16",
        quantization="int4",
        max_num_batched_tokens=8,
        kv_cache_memory_gb=0.05,
    )
    prompts = [{"prompt_token_ids": [1, 5, 9, 200, 31, 7, 3, 4, 5, 6, 7]}]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    llm = LLM(**kwargs)
    out = llm.generate(prompts, params, use_tqdm=False)
    layers = llm.engine.runner.model.model.layers
    assert layers[0].self_attn.rotary.rotary_dim == layers[0].self_attn.head_dim // 2
    assert not any(layer.fused_decode.active for layer in layers)
    for module in ("layers.fused_decode", "layers.norm", "models.llama"):
        monkeypatch.setattr(f"tokenmill.{module}.fused_ops", lambda x: None)
    plain = LLM(**kwargs).generate(prompts, params, use_tqdm=False)
    assert out[0].outputs[0].token_ids == plain[0].outputs[0].token_ids
