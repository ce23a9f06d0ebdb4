"""Batch-invariant matmuls at prefill sizes: every output row is bit-identical computed alone
and inside batches of up to 512 rows (random subsets of a pool, so a row is probed at many
positions, across the quantized kernel's 8-row passes and the dense kernel's 4-row blocks and
64-row work items), on one and two threads; and each is close to a float reference.

Quantized: the VNNI kernel batch-invariant mode runs at every row count (quant_linear), for
every block format. Dense: the row-independent kernel (kernels.cpu_dense) where this CPU has it,
and `Linear` in batch-invariant mode, whichever path this host takes (that kernel, or oneDNN on
fixed row tiles where oneDNN has AMX)."""

from __future__ import annotations

import pytest
import torch
from test_kernel_row_invariance import block_weight, num_threads

from tokenmill.kernels.cpu_dense import dense_linear, dense_supported, pack_dense
from tokenmill.kernels.cpu_quant import load_cpu_quant, quant_linear
from tokenmill.layers.linear import Linear
from tokenmill.quant import unquantized
from tokenmill.quant.packing import pack_tiles

POOL = 512
SIZES = (2, 7, 96, 97, 255, 256, 512)


def assert_rows_invariant(run, pool: torch.Tensor, seed: int) -> None:
    """`run(x)` maps rows [m, K] to outputs [m, N]; every row of a batch drawn from `pool` must
    equal that row alone, on 1 and on 2 threads."""
    with num_threads(1):
        alone = torch.cat([run(pool[i : i + 1]) for i in range(len(pool))])
    g = torch.Generator().manual_seed(seed)
    for threads, sizes in ((1, SIZES), (2, (97, 512))):
        with num_threads(threads):
            for m in sizes:
                idx = torch.randperm(len(pool), generator=g)[:m]
                out = run(pool[idx])
                if not torch.equal(out, alone[idx]):
                    bad = next(i for i in range(m) if not torch.equal(out[i], alone[idx[i]]))
                    raise AssertionError(
                        f"row {int(idx[bad])} differs at position {bad} of a batch of {m} on "
                        f"{threads} thread(s) from the same row alone"
                    )


def close_to(y: torch.Tensor, ref: torch.Tensor, rel: float) -> None:
    err = (y.double() - ref).abs().max().item()
    assert err <= rel * ref.abs().max().item(), f"max error {err} vs scale {ref.abs().max()}"


@pytest.mark.skipif(load_cpu_quant() is None, reason="no quantized CPU kernel here")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("fmt", ["Q4_0", "Q4_1", "Q8_0", "int8", "int4"])
def test_quant_linear_rows_invariant_to_512(fmt: str, dtype: torch.dtype) -> None:
    n, k = 40, 160  # 2.5 tiles of 16 output rows; 5 blocks of 32
    bw = block_weight(fmt, n, k)
    packed = pack_tiles(bw)
    pool = torch.randn(POOL, k, generator=torch.Generator().manual_seed(7)).to(dtype)
    assert_rows_invariant(lambda x: quant_linear(x, packed, n, bw.bits), pool, seed=1)
    # int8 activations (per block of 32) against the exact product with the same weights
    ref = pool.double() @ bw.dequantize().double().t()
    close_to(quant_linear(pool, packed, n, bw.bits), ref, rel=0.03)


def dense_case(dtype: torch.dtype, n: int, k: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(n * k)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    pool = torch.randn(POOL, k, generator=g).to(dtype)
    return w, bias, pool


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
# 13: K odd (a half pair in bfloat16), one partial tile; 96 x 70: 4 full tiles and a partial
# one past a 4-tile block; 200 x 37: 3 tiles (a 3-tile block)
@pytest.mark.parametrize(("k", "n"), [(13, 5), (96, 70), (200, 37)])
def test_dense_kernel_rows_invariant(dtype: torch.dtype, k: int, n: int) -> None:
    if not dense_supported(dtype):
        pytest.skip(f"no row-independent {dtype} kernel on this CPU")
    w, bias, pool = dense_case(dtype, n, k)
    packed = pack_dense(w)
    assert_rows_invariant(lambda x: dense_linear(x, packed, bias, n), pool, seed=2)
    ref = pool.double() @ w.double().t() + bias.double()
    close_to(dense_linear(pool, packed, bias, n), ref, rel=1e-5 if dtype == torch.float32 else 1e-2)
    no_bias = dense_linear(pool[:9], packed, None, n)
    close_to(no_bias, ref[:9] - bias.double(), rel=1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("amx", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dense_linear_batch_invariant_mode(
    dtype: torch.dtype, amx: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dense `Linear` in batch-invariant mode, on both bfloat16 paths (oneDNN on fixed row
    tiles, taken where oneDNN has AMX, and the row-independent kernel where this CPU has it)."""
    monkeypatch.setattr(unquantized, "onednn_uses_amx", lambda: amx)
    n, k = 70, 96
    w, bias, pool = dense_case(dtype, n, k)
    layer = Linear(k, n, bias=True, dtype=dtype)
    layer.weight.data.copy_(w)
    layer.bias.data.copy_(bias)
    layer.quant_method.process_after_loading(layer)
    layer.batch_invariant = True
    with torch.inference_mode():
        assert_rows_invariant(layer, pool, seed=3)
        ref = pool.double() @ w.double().t() + bias.double()
        close_to(layer(pool), ref, rel=1e-5 if dtype == torch.float32 else 1e-2)
