"""The QuantMethod seam: a Linear gets its method from the model's quantization scheme, a method
refuses weights of another kind with a clear error, and a quantized layer whose weight arrived
dense runs exactly as a dense layer."""

from __future__ import annotations

import pytest
import torch

from tokenmill.layers.linear import Linear, MergedLinear
from tokenmill.quant.base import make_quant_method
from tokenmill.quant.block import BlockQuantMethod
from tokenmill.quant.packing import quantize_rtn
from tokenmill.quant.rtn import quantize_at_load
from tokenmill.quant.squeezellm import SqueezeLLMMethod
from tokenmill.quant.squeezellm_fit import quantize_squeezellm
from tokenmill.quant.unquantized import UnquantizedMethod


def test_the_scheme_picks_the_method() -> None:
    assert isinstance(Linear(64, 8).quant_method, UnquantizedMethod)
    assert isinstance(Linear(64, 8, quant="blocks").quant_method, BlockQuantMethod)
    merged = MergedLinear(64, [8, 8], ("gate_proj", "up_proj"), quant="squeezellm")
    assert isinstance(merged.quant_method, SqueezeLLMMethod)
    with pytest.raises(ValueError, match="unknown quantization scheme"):
        make_quant_method("gptq")  # type: ignore[arg-type]


def test_a_weight_of_another_kind_is_a_clear_error() -> None:
    w = torch.randn(8, 64)
    with pytest.raises(ValueError, match="built without quantization"):
        Linear(64, 8).load_quantized(quantize_rtn(w, 4))
    sq = quantize_squeezellm(w, torch.ones(64), bits=4, sparsity=0.0)
    with pytest.raises(ValueError, match="block-quantized"):
        Linear(64, 8, quant="blocks").load_quantized(sq)
    with pytest.raises(ValueError, match="SqueezeLLM"):
        Linear(64, 8, quant="squeezellm").load_quantized(quantize_rtn(w, 4))


@pytest.mark.parametrize("scheme", ["blocks", "squeezellm"])
def test_a_dense_weight_in_a_quantized_model_runs_dense(scheme: str) -> None:
    """The LM head of a quantized checkpoint often stays dense: its layer falls back to the
    dense method and computes what a dense layer computes."""
    g = torch.Generator().manual_seed(0)
    w, b, x = torch.randn(8, 64, generator=g), torch.randn(8, generator=g), torch.randn(3, 64)
    dense, quant = Linear(64, 8, bias=True), Linear(64, 8, bias=True, quant=scheme)
    for layer in (dense, quant):
        layer.weight.data.copy_(w)
        layer.bias.data.copy_(b)
        layer.quant_method.process_after_loading(layer)
    assert isinstance(quant.quant_method, UnquantizedMethod)
    assert torch.equal(quant(x), dense(x))


def test_round_to_nearest_at_load_touches_decoder_linears_only() -> None:
    w = torch.randn(8, 64)
    names = ["model.layers.0.mlp.down_proj.weight", "model.embed_tokens.weight", "lm_head.weight"]
    out = dict(quantize_at_load(iter((n, w) for n in names), bits=4))
    assert out["model.layers.0.mlp.down_proj.weight"].bits == 4
    assert out["model.embed_tokens.weight"] is w and out["lm_head.weight"] is w
