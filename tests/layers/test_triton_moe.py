"""The Triton fused-MoE kernel (kernels/triton_moe.py): every active expert of a projection in
one launch, dense or quantized (4 / 8-bit blocks), matches per-expert dense float64 matmuls
within the dtype's rounding; an expert with no rows, experts spanning several row tiles; and
a MoE layer (Experts) on it matches the dense all-experts reference and the per-expert loop.

Without CUDA the kernel runs on CPU tensors under Triton's interpreter (see utils_triton).
"""

from __future__ import annotations

import pytest
import torch

from utils_triton import CUDA, interpreted  # sets TRITON_INTERPRET first

pytest.importorskip("triton")

from tokenmill.kernels import triton_moe as tm  # noqa: E402
from tokenmill.layers import moe_triton  # noqa: E402
from tokenmill.layers.linear import Linear  # noqa: E402
from tokenmill.layers.moe import Experts, route  # noqa: E402
from tokenmill.quant import block as block_method  # noqa: E402
from tokenmill.quant import gpu_layout as gl  # noqa: E402
from tokenmill.quant.packing import quantize_rtn  # noqa: E402

tm = interpreted(tm)

DEVICE = torch.device("cuda" if CUDA else "cpu")
COUNTS = [3, 0, 21, 1]  # an idle expert, and one over two 16-row tiles


def per_expert_ref(x: torch.Tensor, weights: list[torch.Tensor], counts: list[int]):
    """Each expert's rows times its [N, K] weight, in float64 (x as given, weights as given)."""
    out, start = [], 0
    for w, n in zip(weights, counts, strict=True):
        out.append(x[start : start + n].double().cpu() @ w.double().cpu().T)
        start += n
    return torch.cat(out)


def check_close(y: torch.Tensor, ref: torch.Tensor, x: torch.Tensor, mag: torch.Tensor) -> None:
    """Within x's dtype's rounding of each weight and of y (eps relative: the interpreter's
    casts truncate) plus float32 summation over K."""
    eps = torch.finfo(x.dtype).eps
    bound = eps * (mag + ref.abs()) + x.shape[1] * 2**-24 * mag + 1e-30
    err = (y.double().cpu() - ref).abs()
    assert y.dtype == x.dtype and y.shape == ref.shape
    assert (err <= bound).all(), f"max err/bound {(err / bound).max().item():.2f}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_experts_match_per_expert_matmuls(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    n, k = 40, 96  # N not a multiple of the tile
    w = torch.randn(len(COUNTS), n, k, generator=g).to(dtype)
    x = torch.randn(sum(COUNTS), k, generator=g).to(dtype)
    y = tm.moe_matmul(x.to(DEVICE), tm.MoeWeights(w.to(DEVICE)), COUNTS)
    ref = per_expert_ref(x, list(w), COUNTS)
    mag = per_expert_ref(x.abs(), list(w.abs()), COUNTS)
    check_close(y, ref, x, mag)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_experts_match_their_dequantized_weights(bits: int) -> None:
    g = torch.Generator().manual_seed(bits)
    n, k = 40, 96
    bws = [quantize_rtn(torch.randn(n, k, generator=g), bits) for _ in COUNTS]
    packed = [gl.pack_for_gpu(bw) for bw in bws]
    stacked = tm.MoeWeights(
        torch.stack([p.qweight for p in packed]), torch.stack([p.d for p in packed]),
        torch.stack([p.m for p in packed]), bits,
    )  # fmt: skip
    assert stacked.shape == (len(COUNTS), n, k)
    x = torch.randn(sum(COUNTS), k, generator=g).bfloat16()
    y = tm.moe_matmul(x.to(DEVICE), stacked, COUNTS)
    dense = [bw.dequantize() for bw in bws]
    ref = per_expert_ref(x, dense, COUNTS)
    check_close(y, ref, x, per_expert_ref(x.abs(), [w.abs() for w in dense], COUNTS))


def test_bad_counts_refused() -> None:
    w = tm.MoeWeights(torch.zeros(2, 16, 32))
    with pytest.raises(ValueError, match="counts over 3 experts for 2"):
        tm.moe_matmul(torch.zeros(4, 32), w, [1, 2, 1])


def make_experts(quant: str | None, dtype: torch.dtype) -> Experts:
    torch.manual_seed(0)
    experts = Experts(4, 64, 32, dtype, quant)
    if quant is None:
        experts.gate_up_proj.normal_(0.0, 0.2)
        experts.down_proj.normal_(0.0, 0.2)
    for m in experts.modules():
        if isinstance(m, Linear):
            if quant is not None:
                m.load_quantized(quantize_rtn(torch.randn(m.out_features, m.in_features), 4))
            m.quant_method.process_after_loading(m)
    return experts


@pytest.mark.parametrize("quant", [None, "blocks"])
def test_experts_take_the_fused_kernel(monkeypatch, quant: str | None) -> None:
    """Through the MoE layer: one stack per projection (quantized experts' own weights become
    views of it), and the output of the per-expert loop (dense: of the dense reference)."""
    monkeypatch.setattr(moe_triton, "_use_triton_moe", lambda device: True)
    monkeypatch.setattr(block_method, "_use_triton", lambda device: True)
    dtype = torch.float32 if quant is None else torch.bfloat16
    experts = make_experts(quant, dtype)
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(1)).to(dtype)
    weights, ids = route(torch.randn(6, 4), 2, renormalize=True)
    y = experts(x, weights, ids)
    assert experts.triton_stacks is not None and experts.use_triton
    experts.use_triton = False  # the per-expert loop
    loop = experts(x, weights, ids)
    if quant is None:
        torch.testing.assert_close(y, experts.reference(x, weights, ids), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(y, loop, atol=1e-5, rtol=1e-5)
    else:
        gate_up = experts.triton_stacks[0]
        assert gate_up.bits == 4 and gate_up.w.shape == (4, 64, 32)
        lin = experts[2].gate_up_proj
        assert lin.quant_method.gpu_weight.qweight.data_ptr() == gate_up.w[2].data_ptr()
        # bf16 rounding of h between the projections: a few ulps of the output's scale
        assert (y.float() - loop.float()).abs().max() <= 2**-6 * loop.float().abs().max()


def test_cpu_experts_keep_their_path() -> None:
    """On a CPU (no monkeypatch) the fused kernel is not asked for."""
    experts = make_experts(None, torch.float32)
    x = torch.randn(3, 64)
    weights, ids = route(torch.randn(3, 4), 2, renormalize=True)
    experts(x, weights, ids)
    assert experts.triton_stacks is None
