"""Quantized weights: GGUF blocks repacked bit-exactly, the C++ kernel against references on odd
shapes, row independence, round-to-nearest int8/int4, and models loaded quantized."""

from __future__ import annotations

import pytest
import torch
from cpu_kernel_utils import gguf_tensor

from tokenmill.kernels.cpu_quant import dequantize_packed, load_cpu_quant, quant_linear
from tokenmill.quant.packing import (
    GGUF_FORMATS,
    pack_tiles,
    quantize_activations_ref,
    quantize_rtn,
    unpack_tiles,
)

needs_kernel = pytest.mark.skipif(
    load_cpu_quant() is None, reason="the quantized CPU kernel cannot be built here"
)


@pytest.mark.parametrize("qtype", sorted(GGUF_FORMATS))
@pytest.mark.parametrize("rows", [1, 16, 37])
def test_gguf_blocks_repack_bit_exact(qtype: str, rows: int) -> None:
    qt, ref = gguf_tensor(qtype, rows, 96, seed=rows)
    bw = qt.unpack()
    assert torch.equal(bw.dequantize(), torch.from_numpy(ref))
    packed = pack_tiles(bw)
    assert packed.shape[0] == -(-rows // 16)
    back = unpack_tiles(packed, rows, bw.bits)
    assert torch.equal(back.dequantize(), torch.from_numpy(ref))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [32, 64, 192])
def test_rtn_error_within_half_a_step(bits: int, group: int) -> None:
    torch.manual_seed(bits + group)
    # row scales well inside fp16's normal range (the scales are stored as fp16, like GGUF's)
    w = torch.randn(24, 192) * (torch.rand(24, 1) * 4 + 0.25)
    bw = quantize_rtn(w, bits, group)
    assert bw.q.max() <= (1 << bits) - 1
    err = (bw.dequantize() - w).abs()
    step = bw.d.float().repeat_interleave(32, dim=1)
    # half a step, plus fp16 rounding of the offset and the scale over up to 2^bits - 1 steps
    bound = (
        step * (0.5 + 2**-10 * (1 << bits)) + bw.m.float().abs().repeat_interleave(32, 1) * 2**-11
    )
    assert (err <= bound + 1e-6).all()
    per_group = bw.d.reshape(24, -1, group // 32)
    assert (per_group == per_group[..., :1]).all()  # one scale per group


def reference(x: torch.Tensor, w: torch.Tensor, quantize_x: bool) -> torch.Tensor:
    if quantize_x:  # what the kernel computes up to float32 summation order
        xq, dx = quantize_activations_ref(x)
        x = (xq.reshape(x.shape[0], -1, 32) * dx.unsqueeze(-1)).reshape(x.shape)
    return (x.double() @ w.double().T).float()


CASES = [(1, 1, 32), (3, 15, 96), (5, 37, 576), (17, 200, 1536), (4, 16, 64), (33, 48, 160)]


@needs_kernel
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize(("m", "n", "k"), CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_references(bits: int, m: int, n: int, k: int, dtype: torch.dtype) -> None:
    torch.manual_seed(m * 1000 + n + k)
    w = torch.randn(n, k) * 0.05
    bw = quantize_rtn(w, bits)
    wd = bw.dequantize()
    x = torch.randn(m, k).to(dtype)
    y = quant_linear(x, pack_tiles(bw), n, bits)
    assert y.shape == (m, n) and y.dtype == dtype
    scale = reference(x.float(), wd, False).abs().max().item() + 1e-6
    # Against the kernel's own arithmetic (int8 activations): float32 summation order only
    # (plus the bf16 rounding of y).
    exact = reference(x.float(), wd, True)
    tol = 2e-5 if dtype == torch.float32 else 2**-8
    assert (y.float() - exact).abs().max().item() <= tol * scale * max(1, k // 256)
    # Against dequantize-then-matmul in float64: int8 activations cost < 2% of the output range.
    dense = reference(x.float(), wd, False)
    assert (y.float() - dense).abs().max().item() <= 2e-2 * scale


@needs_kernel
@pytest.mark.parametrize("bits", [4, 8])
def test_kernel_rows_independent_of_batch(bits: int) -> None:
    torch.manual_seed(1)
    n, k = 70, 288
    packed = pack_tiles(quantize_rtn(torch.randn(n, k), bits))
    x = torch.randn(11, k).bfloat16()
    together = quant_linear(x, packed, n, bits)
    for i in range(11):
        assert torch.equal(quant_linear(x[i : i + 1], packed, n, bits)[0], together[i])
    assert torch.equal(quant_linear(x[3:9], packed, n, bits), together[3:9])


@needs_kernel
def test_kernel_rejects_bad_input() -> None:
    packed = pack_tiles(quantize_rtn(torch.randn(20, 64), 4))
    with pytest.raises(RuntimeError, match="K = 96"):
        quant_linear(torch.randn(2, 96), packed, 20, 4)
    with pytest.raises(RuntimeError, match="does not fit"):
        quant_linear(torch.randn(2, 64), packed, 40, 4)
    with pytest.raises(RuntimeError, match="record size"):
        quant_linear(torch.randn(2, 64), packed, 20, 8)
    assert quant_linear(torch.randn(0, 64), packed, 20, 4).shape == (0, 20)


@needs_kernel
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize(("n", "k"), [(1, 32), (37, 96), (200, 576)])
def test_dequantize_packed_bit_exact(bits: int, n: int, k: int) -> None:
    bw = quantize_rtn(torch.randn(n, k), bits)
    w = dequantize_packed(pack_tiles(bw), n, bits)
    assert w.dtype == torch.bfloat16
    assert torch.equal(w, bw.dequantize().bfloat16())


@needs_kernel
def test_large_batches_take_the_dense_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where oneDNN has AMX (forced here), default mode dequantizes large bfloat16 batches."""
    from tokenmill.layers.linear import Linear
    from tokenmill.quant import block
    from tokenmill.quant.block import DENSE_ABOVE_ROWS

    monkeypatch.setattr(block, "onednn_uses_amx", lambda: True)

    torch.manual_seed(0)
    layer = Linear(64, 40, bias=True, dtype=torch.bfloat16, quant="blocks")
    layer.weight.data.zero_()
    layer.bias.data.normal_()
    bw = quantize_rtn(torch.randn(40, 64), 4)
    layer.load_quantized(bw)
    layer.quant_method.process_after_loading(layer)
    x = torch.randn(DENSE_ABOVE_ROWS + 5, 64).bfloat16()
    dense = torch.nn.functional.linear(x, bw.dequantize().bfloat16(), layer.bias)
    assert torch.equal(layer(x), dense)
    small = layer(x[:3])  # the int8 kernel: close, not equal
    assert (small.float() - dense[:3].float()).abs().max() < 0.05 * dense.float().abs().max()
    layer.batch_invariant = True  # rows must not depend on the batch: always the kernel
    assert torch.equal(layer(x)[:3], small)


@needs_kernel
def test_large_batches_stay_on_the_kernel_without_amx(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where oneDNN has no AMX (forced here) the kernel serves every row count in default mode
    too, so it computes what batch-invariant mode does."""
    from tokenmill.layers.linear import Linear
    from tokenmill.quant import block

    monkeypatch.setattr(block, "onednn_uses_amx", lambda: False)
    torch.manual_seed(0)
    layer = Linear(64, 40, bias=True, dtype=torch.bfloat16, quant="blocks")
    layer.weight.data.zero_()
    layer.bias.data.normal_()
    layer.load_quantized(quantize_rtn(torch.randn(40, 64), 4))
    layer.quant_method.process_after_loading(layer)
    x = torch.randn(block.DENSE_ABOVE_ROWS + 5, 64).bfloat16()
    default = layer(x)
    layer.batch_invariant = True
    assert torch.equal(layer(x), default)
