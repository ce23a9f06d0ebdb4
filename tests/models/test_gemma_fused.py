"""Gemma 2 and Gemma 3 decode steps through the whole-layer fused C++ op (bf16, quantized
blocks): each layer's output equals the PyTorch layer's on the same inputs, and the greedy
tokens equal those of an engine without the op, with prompts and outputs past the window."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tokenmill import LLM, SamplingParams
from tokenmill.kernels.cpu_fused import load_cpu_fused
from utils_tiny import make_tiny_hf_folder

pytestmark = pytest.mark.skipif(
    load_cpu_fused() is None, reason="the fused CPU ops cannot be built here"
)

# head_dim 64 (the C++ decode attention takes multiples of 32), a scale that is not
# head_dim ** -0.5, a window shorter than the prompts and outputs
SHAPE = dict(
    hidden_size=256, intermediate_size=512, head_dim=64, query_pre_attn_scalar=48,
    sliding_window=8, num_hidden_layers=3,
)  # fmt: skip
EXTRA: dict[str, dict[str, Any]] = {
    # a soft-cap small enough to bite on random weights
    "Gemma2ForCausalLM": dict(attn_logit_softcapping=5.0, final_logit_softcapping=10.0),
    # one global layer in three, its RoPE base apart from the local layers'
    "Gemma3ForCausalLM": dict(sliding_window_pattern=3, rope_local_base_freq=100.0),
}
PROMPTS = [[1, 5, 9, 200, 31, 7], list(range(3, 20)), [40, 41, 42]]
PARAMS = SamplingParams(max_tokens=14, temperature=0.0, ignore_eos=True)


def make_llm(tmp_path: Path, arch: str, quantization: str) -> LLM:
    folder = make_tiny_hf_folder(tmp_path, arch, **SHAPE, **EXTRA[arch])
    return LLM(
        model=str(folder), dtype="bfloat16", quantization=quantization,
        max_num_batched_tokens=8, kv_cache_memory_gb=0.05,
    )  # fmt: skip


def generate(llm: LLM) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], PARAMS, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("arch", list(EXTRA))
def test_fused_layer_matches_the_pytorch_layer(tmp_path: Path, arch: str) -> None:
    """At every decode step, each layer run again on the same inputs without the fused op (its
    KV writes are the same values to the same slots) gives the same residual stream."""
    llm = make_llm(tmp_path, arch, "int4")
    layers = llm.engine.runner.model.model.layers
    compared = []

    def check(layer: Any, args: tuple, out: tuple[torch.Tensor, torch.Tensor]) -> None:
        ctx = args[3]
        if isinstance(layer.fused_decode, _Unfused) or not layer.fused_decode.active:
            return  # the reference call below, or a layer not fused
        attn = layer.self_attn.attn
        if attn.backend.decode_kernel_args(ctx.attn_metas[attn.kv_group]) is None:
            return  # a step with prompt chunks: the layer ran unfused
        fused = layer.fused_decode
        layer.fused_decode = _Unfused()
        try:
            ref = layer(*args)
        finally:
            layer.fused_decode = fused
        # the stream leaves a layer in two parts (out, residual); their sum is what counts
        torch.testing.assert_close(out[0] + out[1], ref[0] + ref[1], atol=0, rtol=0)
        compared.append(args[1].shape[0])

    for layer in layers:
        layer.register_forward_hook(check)
    generate(llm)
    assert all(layer.fused_decode.active for layer in layers)
    assert len(compared) >= len(layers) * (PARAMS.max_tokens - 2) and max(compared) > 1


class _Unfused:
    """Stands in for a layer's FusedDecodeLayer: never fused."""

    def __call__(self, *args: Any) -> None:
        return None


@pytest.mark.parametrize(("arch", "quantization"), [
    ("Gemma2ForCausalLM", "int4"), ("Gemma3ForCausalLM", "int4"), ("Gemma3ForCausalLM", "int8"),
])  # fmt: skip
def test_fused_greedy_tokens_match_unfused(
    tmp_path: Path, monkeypatch, arch: str, quantization: str
) -> None:
    fused_llm = make_llm(tmp_path, arch, quantization)
    fused = generate(fused_llm)
    assert all(layer.fused_decode.active for layer in fused_llm.engine.runner.model.model.layers)
    monkeypatch.setattr("tokenmill.layers.fused_decode.fused_ops", lambda x: None)
    plain_llm = make_llm(tmp_path / "plain", arch, quantization)
    assert generate(plain_llm) == fused
    plain_layers = plain_llm.engine.runner.model.model.layers
    assert not any(layer.fused_decode.active for layer in plain_layers)
