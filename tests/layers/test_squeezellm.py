"""SqueezeLLM: weighted k-means against round-to-nearest, the dense-and-sparse split, the C++
lookup-table kernel and the dequantizing fallback against the dequantize-then-matmul reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tokenmill.kernels.cpu_lut import kernel_lut, load_cpu_lut, lut_dequantize, lut_linear
from tokenmill.layers.linear import Linear, MergedLinear
from tokenmill.quant import squeezellm
from tokenmill.quant.packing import quantize_rtn
from tokenmill.quant.squeezellm import SqueezeLLMMethod, cat_rows, pack_codes, unpack_codes
from tokenmill.quant.squeezellm_fit import outlier_mask, quantize_squeezellm
from tokenmill.quant.unquantized import UnquantizedMethod

needs_kernel = pytest.mark.skipif(
    load_cpu_lut() is None, reason="the SqueezeLLM CPU kernel cannot be built here"
)


def heavy_tailed(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Bell-shaped rows of different scales with a few large outliers, like trained weights."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * (torch.rand(rows, 1, generator=g) + 0.1)
    spikes = torch.rand(rows, cols, generator=g) < 0.005
    return torch.where(spikes, w * 12, w)


@pytest.mark.parametrize("bits", [3, 4])
def test_kmeans_error_below_rtn_per_row(bits: int) -> None:
    w = heavy_tailed(48, 256, seed=bits)
    sens = torch.rand(256, generator=torch.Generator().manual_seed(7)) ** 4  # uneven channels
    sq = quantize_squeezellm(w, sens, bits, sparsity=0.0)  # no outlier help: k-means alone
    assert sq.val.numel() == 0
    rtn = quantize_rtn(w, bits, group=256).dequantize()  # per-channel RTN, same bits
    err_sq = ((sq.dequantize() - w) ** 2 * sens).sum(1)
    err_rtn = ((rtn - w) ** 2 * sens).sum(1)
    assert (err_sq <= err_rtn).all()
    assert err_sq.sum() < 0.5 * err_rtn.sum()  # and by a wide margin on heavy tails
    assert int(unpack_codes(sq.codes, 256).max()) < (1 << bits)


def test_sparse_part_holds_exactly_the_outliers() -> None:
    w = heavy_tailed(40, 96, seed=3)
    sparsity = 0.01
    sq = quantize_squeezellm(w, torch.rand(96), 4, sparsity=sparsity)
    rows = sq.sparse_rows()
    chosen = torch.zeros_like(w, dtype=torch.bool)
    chosen[rows, sq.col.long()] = True
    expected = outlier_mask(w, sparsity)
    assert sq.val.numel() == round(sparsity * w.numel()) == int(expected.sum())
    assert torch.equal(chosen, expected)
    # the chosen entries are the matrix's largest magnitudes
    assert w.abs()[expected].min() >= w.abs()[~expected].max()
    deq = sq.dequantize()
    # exact up to one float32 rounding of lut + residual
    assert torch.allclose(deq[expected], w[expected], rtol=2**-23, atol=0)
    assert ((deq - w).abs()[~expected] > 0).any()  # the rest is really quantized


@pytest.mark.parametrize("cols", [1, 7, 64])
def test_codes_pack_round_trip(cols: int) -> None:
    codes = torch.randint(0, 16, (5, cols))
    packed = pack_codes(codes)
    assert packed.shape == (5, (cols + 1) // 2) and packed.dtype == torch.uint8
    assert torch.equal(unpack_codes(packed, cols), codes)


CASES = [(1, 1, 1), (3, 15, 37), (5, 37, 576), (17, 200, 1536), (4, 16, 48), (9, 33, 160)]


@needs_kernel
@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize(("m", "n", "k"), CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_reference(bits: int, m: int, n: int, k: int, dtype: torch.dtype) -> None:
    torch.manual_seed(m * 1000 + n + k)
    sq = quantize_squeezellm(heavy_tailed(n, k, seed=k), torch.rand(k), bits, sparsity=0.01)
    x = torch.randn(m, k).to(dtype)
    y = lut_linear(x, sq.codes, kernel_lut(sq.lut), sq.crow, sq.col, sq.val)
    assert y.shape == (m, n) and y.dtype == dtype
    ref = (x.double() @ sq.dequantize().double().T).float()
    scale = ref.abs().max().item() + 1e-6
    # float32 summation order only, plus the bf16 rounding of y
    tol = 1e-5 if dtype == torch.float32 else 2**-8
    assert (y.float() - ref).abs().max().item() <= tol * scale * max(1, k // 256)


@needs_kernel
def test_kernel_rows_independent_of_batch() -> None:
    sq = quantize_squeezellm(heavy_tailed(70, 290, seed=1), None, 4, sparsity=0.01)
    args = (sq.codes, kernel_lut(sq.lut), sq.crow, sq.col, sq.val)
    x = torch.randn(11, 290)
    together = lut_linear(x, *args)
    for i in range(11):
        assert torch.equal(lut_linear(x[i : i + 1], *args)[0], together[i])
    assert lut_linear(x[:0], *args).shape == (0, 70)


@needs_kernel
def test_kernel_rejects_bad_input() -> None:
    sq = quantize_squeezellm(heavy_tailed(8, 64, seed=2), None, 4, sparsity=0.05)
    args = [sq.codes, kernel_lut(sq.lut), sq.crow, sq.col, sq.val]
    with pytest.raises(RuntimeError, match="codes must be"):
        lut_linear(torch.randn(2, 96), *args)
    with pytest.raises(RuntimeError, match="lut must be"):
        lut_linear(torch.randn(2, 64), args[0], sq.lut[:, :8].float(), *args[2:])
    bad_col = sq.col.clone()
    bad_col[0] = 64
    with pytest.raises(RuntimeError, match="out of range"):
        lut_linear(torch.randn(2, 64), *args[:3], bad_col, sq.val)


def merged_layer(dtype: torch.dtype, bias: bool) -> tuple[MergedLinear, torch.Tensor]:
    """A q/k/v-style fused layer fed one SqueezeLLM part per shard; returns it and the dense
    float32 weight those parts dequantize to."""
    layer = MergedLinear(
        96, [40, 24, 24], ("q_proj", "k_proj", "v_proj"), bias=bias, dtype=dtype, quant="squeezellm"
    )
    if bias:
        layer.bias.data.normal_()
    parts = []
    for i, shard in enumerate(layer.shard_names):
        rows = layer.shard_sizes[i]
        sq = quantize_squeezellm(heavy_tailed(rows, 96, seed=i), None, 3, sparsity=0.01)
        layer.load_quantized(sq, shard)
        parts.append(sq)
    assert isinstance(layer.quant_method, SqueezeLLMMethod)
    return layer, cat_rows(parts).dequantize()


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_layer_through_the_kernel(dtype: torch.dtype) -> None:
    layer, w = merged_layer(dtype, bias=True)
    layer.quant_method.process_after_loading(layer)
    assert "weight" not in layer._parameters
    assert layer.quant_method.describe(layer) == "squeezellm3"
    # 3-bit codes take 4-bit slots: 0.5 byte per weight + fp16 LUTs (8 per row) + CSR
    nnz = sum(round(0.01 * r * 96) for r in layer.shard_sizes)
    assert layer.weight_bytes == 88 * 48 + 88 * 8 * 2 + 89 * 4 + nnz * 8
    x = torch.randn(6, 96).to(dtype)
    ref = F.linear(x.double(), w.double(), layer.bias.double()).float()
    tol = 1e-5 if dtype == torch.float32 else 2**-7
    y = layer(x)
    assert y.dtype == dtype
    assert (y.float() - ref).abs().max() <= tol * ref.abs().max()


def test_fallback_dequantizes_at_load(monkeypatch, caplog) -> None:
    monkeypatch.setattr(squeezellm, "load_cpu_lut", lambda: None)
    layer, w = merged_layer(torch.float32, bias=False)
    with caplog.at_level("WARNING"):
        layer.quant_method.process_after_loading(layer)
    assert "SqueezeLLM kernel unavailable" in caplog.text
    assert isinstance(layer.quant_method, UnquantizedMethod)
    assert torch.equal(layer.weight.data, w)
    x = torch.randn(3, 96)
    assert torch.equal(layer(x), F.linear(x, w))


def test_plain_linear_takes_squeezellm_weights() -> None:
    layer = Linear(64, 20, dtype=torch.float32, quant="squeezellm")
    sq = quantize_squeezellm(heavy_tailed(20, 64, seed=5), None, 4)
    layer.load_quantized(sq)
    layer.quant_method.process_after_loading(layer)
    x = torch.randn(2, 64)
    ref = F.linear(x.double(), sq.dequantize().double()).float()
    assert torch.allclose(layer(x), ref, rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize(("n", "k"), [(1, 1), (37, 97), (200, 576)])
def test_dequantize_kernel_bit_exact(n: int, k: int) -> None:
    sq = quantize_squeezellm(heavy_tailed(n, k, seed=n), torch.rand(k), 4, sparsity=0.02)
    w = lut_dequantize(sq.codes, kernel_lut(sq.lut), sq.crow, sq.col, sq.val, k)
    assert w.dtype == torch.bfloat16
    assert torch.equal(w, sq.dequantize().bfloat16())


@needs_kernel
def test_large_batches_take_the_dense_path() -> None:
    from tokenmill.quant.squeezellm import DENSE_ABOVE_ROWS

    layer = Linear(64, 40, bias=True, dtype=torch.bfloat16, quant="squeezellm")
    layer.bias.data.normal_()
    sq = quantize_squeezellm(heavy_tailed(40, 64, seed=9), None, 4, sparsity=0.02)
    layer.load_quantized(sq)
    layer.quant_method.process_after_loading(layer)
    x = torch.randn(DENSE_ABOVE_ROWS + 3, 64).bfloat16()
    dense = F.linear(x, sq.dequantize().bfloat16(), layer.bias)
    assert torch.equal(layer(x), dense)
    small = layer(x[:3])  # the lookup kernel (float32 weights): close, not equal
    assert (small.float() - dense[:3].float()).abs().max() < 0.02 * dense.float().abs().max()
    layer.batch_invariant = True  # rows must not depend on the batch: always the kernel
    assert torch.equal(layer(x)[:3], small)
