"""The fused bfloat16 CPU layer ops (csrc/fused_ops.cpp) against the PyTorch code they replace:
same roundings, odd sizes, rows independent of their neighbours, and a whole model's greedy
output unchanged."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tokenmill import LLM, SamplingParams
from tokenmill.kernels.cpu_fused import load_cpu_fused
from tokenmill.layers.rotary import RotaryEmbedding
from tokenmill.models.gemma import GemmaRMSNorm
from utils_tiny import make_tiny_hf_folder

pytestmark = pytest.mark.skipif(
    load_cpu_fused() is None, reason="the fused CPU ops cannot be built here"
)


def bf16_ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance between a and b in bfloat16 steps (same-sign values)."""
    ia = a.view(torch.int16).int()
    ib = b.view(torch.int16).int()
    return int((ia - ib).abs().max())


def reference_norm(x, residual, weight, eps):
    s = x if residual is None else x + residual
    return weight * F.rms_norm(s.float(), (s.shape[-1],), None, eps).to(s.dtype), s


@pytest.mark.parametrize("rows,hidden", [(1, 576), (5, 70), (33, 1024)])
@pytest.mark.parametrize("with_residual", [True, False])
def test_add_rms_norm_matches_pytorch(rows, hidden, with_residual):
    ops = load_cpu_fused()
    g = torch.Generator().manual_seed(rows * hidden)
    x = torch.randn(rows, hidden, generator=g).bfloat16()
    res = torch.randn(rows, hidden, generator=g).bfloat16() if with_residual else None
    w = torch.randn(hidden, generator=g).bfloat16()
    out, s = ops.add_rms_norm.default(x, res, w, 1e-5)
    ref_out, ref_s = reference_norm(x, res, w, 1e-5)
    assert torch.equal(s, ref_s)  # the residual stream is exact
    # the sum of squares is accumulated in another order: at most one bf16 step apart, rarely
    assert bf16_ulps(out, ref_out) <= 1
    assert (out != ref_out).float().mean() < 0.01
    # each row alone gives the same values as in the batch
    for i in (0, rows - 1):
        one, _ = ops.add_rms_norm.default(
            x[i : i + 1], None if res is None else res[i : i + 1], w, 1e-5
        )
        assert torch.equal(one[0], out[i])


@pytest.mark.parametrize("rows,inter", [(1, 1536), (7, 40), (20, 8)])
def test_silu_mul_matches_pytorch(rows, inter):
    ops = load_cpu_fused()
    g = torch.Generator().manual_seed(inter)
    gate_up = (torch.randn(rows, 2 * inter, generator=g) * 4).bfloat16()
    gate, up = gate_up.chunk(2, dim=-1)
    out = ops.silu_mul.default(gate_up)
    ref = F.silu(gate) * up
    assert bf16_ulps(out, ref) <= 1
    assert (out != ref).float().mean() < 0.01


@pytest.mark.parametrize("rows,hidden", [(1, 576), (5, 70), (33, 1024)])
@pytest.mark.parametrize("with_residual", [True, False])
def test_add_rms_norm_float32_weight_matches_gemma_norm(rows, hidden, with_residual):
    """A float32 weight (Gemma's 1 + w) multiplies the float32 normalized row, rounded once."""
    ops = load_cpu_fused()
    g = torch.Generator().manual_seed(rows + hidden)
    x = torch.randn(rows, hidden, generator=g).bfloat16()
    res = torch.randn(rows, hidden, generator=g).bfloat16() if with_residual else None
    norm = GemmaRMSNorm(hidden, 1e-6, torch.bfloat16)
    norm.weight.data.normal_(std=0.3, generator=g)
    out, s = ops.add_rms_norm.default(x, res, 1.0 + norm.weight.float(), 1e-6)
    ref_s = x if res is None else x + res
    ref_out = norm(ref_s)
    assert torch.equal(s, ref_s)
    assert bf16_ulps(out, ref_out) <= 1
    assert (out != ref_out).float().mean() < 0.01


@pytest.mark.parametrize("rows,inter", [(1, 1536), (9, 2048), (20, 64)])
@pytest.mark.parametrize("scale", [1.0, 4.0, 12.0])
def test_gelu_tanh_mul_matches_pytorch(rows, inter, scale):
    """Gemma's GeGLU: gelu(gate, approximate="tanh") * up, widths that PyTorch's vectorized
    gelu covers whole (its scalar tail computes tanh with another rounding near -1)."""
    ops = load_cpu_fused()
    g = torch.Generator().manual_seed(inter)
    gate_up = (torch.randn(rows, 2 * inter, generator=g) * scale).bfloat16()
    gate, up = gate_up.chunk(2, dim=-1)
    out = ops.gelu_tanh_mul.default(gate_up)
    ref = F.gelu(gate, approximate="tanh") * up
    assert bf16_ulps(out, ref) <= 1
    assert (out != ref).float().mean() < 0.01
    # odd widths: the same values up to the last step of PyTorch's tail
    odd = gate_up[:, : 2 * 37].contiguous()
    gate, up = odd.chunk(2, dim=-1)
    torch.testing.assert_close(
        ops.gelu_tanh_mul.default(odd), F.gelu(gate, approximate="tanh") * up,
        atol=1e-5, rtol=1e-2,
    )  # fmt: skip


@pytest.mark.parametrize("head_dim,heads,kv_heads", [(64, 9, 3), (128, 4, 2), (80, 2, 1)])
def test_rope_cache_matches_pytorch(head_dim, heads, kv_heads):
    ops = load_cpu_fused()
    g = torch.Generator().manual_seed(head_dim)
    rotary = RotaryEmbedding(head_dim, 300, 10000.0, None, torch.bfloat16)
    tokens = 6
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=g).bfloat16()
    positions = torch.tensor([0, 1, 17, 299, 5, 128])
    slots = torch.tensor([0, 17, 33, 63, 5, 40])
    # a per-layer view of a two-layer cache, like the runner binds
    cache = torch.zeros(2, 2, 4, 16, kv_heads, head_dim, dtype=torch.bfloat16)
    k_cache, v_cache = cache[1, 0], cache[1, 1]
    q = ops.rope_cache.default(
        qkv, positions, rotary.cos, rotary.sin, k_cache, v_cache, slots, heads, kv_heads
    )
    q_ref, k_ref, v_ref = qkv.split(
        [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1
    )
    q_ref, k_ref = rotary(
        positions, q_ref.view(tokens, heads, head_dim), k_ref.view(tokens, kv_heads, head_dim)
    )
    assert torch.equal(q, q_ref)
    assert torch.equal(k_cache.reshape(-1, kv_heads, head_dim)[slots], k_ref)
    assert torch.equal(
        v_cache.reshape(-1, kv_heads, head_dim)[slots], v_ref.view(tokens, kv_heads, head_dim)
    )
    assert cache[0].abs().sum() == 0 and cache[1].reshape(2, -1).abs().sum(1).count_nonzero() == 2


def test_rope_cache_rejects_bad_slots():
    ops = load_cpu_fused()
    rotary = RotaryEmbedding(64, 16, 10000.0, None, torch.bfloat16)
    qkv = torch.zeros(1, 3 * 64, dtype=torch.bfloat16)
    cache = torch.zeros(2, 4, 1, 64, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="slot"):
        ops.rope_cache.default(
            qkv, torch.tensor([0]), rotary.cos, rotary.sin, cache, cache.clone(),
            torch.tensor([8]), 1, 1,
        )  # fmt: skip
    with pytest.raises(RuntimeError, match="position"):
        ops.rope_cache.default(
            qkv, torch.tensor([16]), rotary.cos, rotary.sin, cache, cache.clone(),
            torch.tensor([0]), 1, 1,
        )  # fmt: skip


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen2ForCausalLM"])
@pytest.mark.parametrize("quantization", [None, "int4"])
def test_bf16_model_greedy_unchanged_by_fusion(tmp_path, monkeypatch, arch, quantization):
    """A bf16 model decodes the same tokens with the fused ops (and, quantized, the whole-layer
    decode op) as with the PyTorch code, through chunked prefill and decode (head_dim 64: the
    C++ decode attention reads the fused cache writes)."""
    folder = str(make_tiny_hf_folder(tmp_path, arch, hidden_size=256, intermediate_size=512))
    kwargs = dict(
        model=folder,
        dtype="bfloat16",
        quantization=quantization,
        max_num_batched_tokens=8,
        kv_cache_memory_gb=0.05,
    )
    prompts = [[1, 5, 9, 200, 31, 7], [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    fused_llm = LLM(**kwargs)
    fused_out = fused_llm.generate(
        [{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False
    )
    layers = fused_llm.engine.runner.model.model.layers
    whole_layer = [layer.fused_decode.active for layer in layers]
    assert all(whole_layer) == (quantization == "int4") and any(whole_layer) == all(whole_layer)
    monkeypatch.setattr("tokenmill.layers.fused_decode.fused_ops", lambda x: None)
    monkeypatch.setattr("tokenmill.layers.norm.fused_ops", lambda x: None)
    monkeypatch.setattr("tokenmill.models.llama.fused_ops", lambda x: None)
    plain_out = LLM(**kwargs).generate(
        [{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False
    )
    for a, b in zip(fused_out, plain_out, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
