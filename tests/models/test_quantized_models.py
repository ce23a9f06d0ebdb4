"""Models loaded with quantized weights: the default GGUF kept in its blocks, the dense fallback
where the kernel is missing, and int8 / int4 round-to-nearest at load."""

from __future__ import annotations

import logging

import pytest
import torch

from tokenmill import LLM, SamplingParams
from tokenmill.kernels.cpu_quant import load_cpu_quant
from tokenmill.layers.linear import Linear
from tokenmill.quant import block as block_method
from tokenmill.quant.block import BlockQuantMethod
from tokenmill.quant.unquantized import UnquantizedMethod
from utils_tiny import make_tiny_hf_folder

TEXT = (
    "The quick brown fox jumps over the lazy dog. In the beginning God created the heaven and "
    "the earth. And the earth was without form, and void."
)
SMALL = dict(kv_cache_memory_gb=0.1, max_model_len=512)


def linears(llm: LLM) -> dict[str, Linear]:
    model = llm.engine.runner.model
    return {n: m for n, m in model.named_modules() if isinstance(m, Linear)}


def prompt_logprobs(llm: LLM, text: str = TEXT) -> torch.Tensor:
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
    out = llm.generate([text], params, use_tqdm=False)[0]
    ids = out.prompt_token_ids
    return torch.tensor(
        [d[t].logprob for d, t in zip(out.prompt_logprobs[1:], ids[1:], strict=True)]
    )


@pytest.mark.slow
@pytest.mark.skipif(load_cpu_quant() is None, reason="the quantized CPU kernel cannot be built")
def test_default_model_stays_quantized(default_llm_fp32) -> None:
    llm = LLM(dtype="float32", **SMALL)
    layers = linears(llm)
    formats = {n: m.quant_method.describe(m) for n, m in layers.items()}
    assert formats["lm_head"] == "Q8_0"  # tied to the Q8_0 embedding
    assert {f for n, f in formats.items() if n != "lm_head"} == {"Q4_1"}
    assert all("weight" not in m._parameters for m in layers.values())  # no dense copies
    q4_bytes = sum(m.weight_bytes for n, m in layers.items() if n != "lm_head")
    assert q4_bytes == pytest.approx(106_168_320 * 20 / 32, rel=0.01)  # 0.625 bytes per weight
    # Same weights as the dense fp32 engine; only the int8 activations of the kernel differ.
    ref = prompt_logprobs(default_llm_fp32)
    got = prompt_logprobs(llm)
    assert (got - ref).abs().mean() < 0.2
    assert abs(got.mean() - ref.mean()) < 0.1
    params = SamplingParams(max_tokens=8, temperature=0)
    out = llm.generate(["The capital of France is"], params, use_tqdm=False)[0]
    assert out.outputs[0].text.startswith(" Paris")


@pytest.mark.slow
def test_fallback_without_kernel_equals_dequantized(default_llm_fp32, monkeypatch, caplog) -> None:
    monkeypatch.setattr(block_method, "load_cpu_quant", lambda: None)
    with caplog.at_level(logging.WARNING):
        # batch-invariant like the reference engine, so both run the same attention kernels
        llm = LLM(dtype="float32", batch_invariant=True, **SMALL)
    assert "quantized CPU kernel unavailable" in caplog.text
    assert all(isinstance(m.quant_method, UnquantizedMethod) for m in linears(llm).values())
    # Dequantized at load exactly as quantization="none" does: identical logits.
    assert torch.equal(prompt_logprobs(llm), prompt_logprobs(default_llm_fp32))


@pytest.mark.skipif(load_cpu_quant() is None, reason="the quantized CPU kernel cannot be built")
@pytest.mark.parametrize(("quantization", "bound"), [("int8", 0.02), ("int4", 0.5)])
def test_rtn_quantization_of_safetensors(tmp_path, quantization: str, bound: float) -> None:
    folder = make_tiny_hf_folder(
        tmp_path, "Qwen2ForCausalLM", hidden_size=128, intermediate_size=256
    )
    dense = LLM(model=str(folder), dtype="float32", **SMALL)
    quant = LLM(model=str(folder), dtype="float32", quantization=quantization, **SMALL)
    methods = {n: m.quant_method for n, m in linears(quant).items()}
    assert isinstance(methods["lm_head"], UnquantizedMethod)
    decoder = [m for n, m in methods.items() if n != "lm_head"]
    assert all(isinstance(m, BlockQuantMethod) for m in decoder)
    assert {m.bits for m in decoder} == {int(quantization[-1])}
    ref, got = prompt_logprobs(dense), prompt_logprobs(quant)
    assert (got - ref).abs().max() < bound


def test_unknown_quantization_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="quantization must be none, int8, int4 or squeezellm"):
        LLM(quantization="awq")
