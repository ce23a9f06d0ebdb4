"""The Triton quantized matmul (triton_quant.py): the GPU layout round-trips bit-exactly, the
kernel matches dense float64 on the dequantized weight within the activation dtype's rounding
(GGUF Q4_0 / Q4_1 / Q8_0, int8 per channel, int4 g=32; odd shapes, bias), rows are independent
of the batch in batch-invariant mode, and a Linear layer takes the Triton path.

Without CUDA the kernels run on CPU tensors under Triton's interpreter: TRITON_INTERPRET=1 must
be set before the kernels are defined (the module is reloaded if something imported it first);
the kernel calls no @jit helper of triton.language, so triton itself may have been imported
earlier in the process (checked in a fresh interpreter by test_interpreter_after_late_env).
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from utils_triton import CUDA, interpreted, run_after_late_env  # sets TRITON_INTERPRET first

pytest.importorskip("triton")

from gguf import GGMLQuantizationType  # noqa: E402
from gguf import quants as gguf_quants  # noqa: E402

from tokenmill.kernels import triton_quant as tq  # noqa: E402
from tokenmill.layers.linear import Linear, MergedLinear  # noqa: E402
from tokenmill.quant import block as block_method  # noqa: E402
from tokenmill.quant import gpu_layout as gl  # noqa: E402
from tokenmill.quant.packing import (  # noqa: E402
    BlockWeights,
    QuantizedTensor,
    quantize_rtn,
)

tq = interpreted(tq)

DEVICE = torch.device("cuda" if CUDA else "cpu")
FORMATS = ["Q4_0", "Q4_1", "Q8_0", "int8", "int4"]


def checkpoint_weight(fmt: str, n: int, k: int, seed: int = 0) -> QuantizedTensor | BlockWeights:
    """What the loader hands a Linear: GGUF blocks quantized by the gguf package, or
    round-to-nearest int8 per channel / int4 with groups of 32."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n, k)) * rng.uniform(0.01, 3.0, (n, 1))).astype(np.float32)
    w[0, :32] = 0.0  # an all-zero block (scale 0)
    if fmt.startswith("Q"):
        raw = gguf_quants.quantize(w, GGMLQuantizationType[fmt])  # uint8 [n, bytes]
        return QuantizedTensor(fmt, torch.from_numpy(raw.copy()), (n, k))
    bits, group = (8, k) if fmt == "int8" else (4, 32)
    return quantize_rtn(torch.from_numpy(w), bits, group)


def block_weights(fmt: str, n: int, k: int, seed: int = 0) -> BlockWeights:
    t = checkpoint_weight(fmt, n, k, seed)
    return t.unpack() if isinstance(t, QuantizedTensor) else t


def check_close(y: torch.Tensor, x: torch.Tensor, wd: torch.Tensor, bias=None) -> None:
    """y vs x @ wd^T (+ bias) in float64. The kernel rounds each dequantized weight to x's
    dtype and y to x's dtype, each off by at most eps relative (eps = 2^-7 for bf16, 2^-10 for
    fp16: round-to-nearest needs half of it, the interpreter's truncating casts all of it),
    and sums in float32 (K * 2^-24 relative to sum |x| |w|)."""
    xd, wdd = x.double().cpu(), wd.double().cpu()
    ref = xd @ wdd.T + (0 if bias is None else bias.double().cpu())
    mag = xd.abs() @ wdd.abs().T  # [M, N]
    eps = torch.finfo(x.dtype).eps
    bound = eps * (mag + ref.abs()) + x.shape[1] * 2**-24 * mag + 1e-30
    err = (y.double().cpu() - ref).abs()
    assert y.dtype == x.dtype and y.shape == ref.shape
    assert (err <= bound).all(), f"max err/bound {(err / bound).max().item():.2f}"


def test_interpreter_engaged_without_cuda() -> None:
    assert tq.interpreted() == (not CUDA)


LATE_ENV_SCRIPT = """
import os, torch, triton.language  # triton first, without the variable
os.environ["TRITON_INTERPRET"] = "1"
from tokenmill.kernels import triton_quant as tq
from tokenmill.quant import gpu_layout as gl
from tokenmill.quant.packing import quantize_rtn
bw = quantize_rtn(torch.randn(40, 64), 4)
x = torch.randn(2, 64).half()
y = tq.quant_matmul(x, gl.pack_for_gpu(bw))
ref = x.double() @ bw.dequantize().double().T
assert tq.interpreted() and (y.double() - ref).abs().max() < 1e-2 * ref.abs().max()
"""


@pytest.mark.skipif(CUDA, reason="the interpreter is only used without CUDA")
def test_interpreter_after_late_env() -> None:
    """triton imported before TRITON_INTERPRET was set (as another test module may do)."""
    proc = run_after_late_env(LATE_ENV_SCRIPT)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("n", "k"), [(1, 32), (37, 96), (72, 160)])
def test_pack_round_trip_bit_exact(fmt: str, n: int, k: int) -> None:
    bw = block_weights(fmt, n, k, seed=n + k)
    g = gl.pack_for_gpu(bw)
    assert g.shape == (n, k) and g.nbytes() == bw.nbytes()
    assert g.qweight.shape == (n, k * bw.bits // 8) and g.d.shape == (k // 32, n)
    back = gl.unpack_gpu(g)
    assert torch.equal(back.q, bw.q) and torch.equal(back.d, bw.d) and torch.equal(back.m, bw.m)
    assert torch.equal(gl.dequantize_gpu(g), bw.dequantize())


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("m", [1, 3, 16, 37])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_matmul_matches_dense(fmt: str, m: int, dtype: torch.dtype) -> None:
    n, k = (72, 160) if m in (3, 37) else (40, 96)  # N never a multiple of the tile
    bw = block_weights(fmt, n, k, seed=m)
    g = gl.pack_for_gpu(bw).to(DEVICE)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(DEVICE, dtype)
    bias = torch.randn(n).to(DEVICE, dtype) if m % 2 else None
    check_close(tq.quant_matmul(x, g, bias), x, bw.dequantize(), bias)


@pytest.mark.parametrize("bits", [4, 8])
def test_other_configs_and_inputs(bits: int) -> None:
    """The prefill tiles (M >= 256), fp32 x, a strided x, leading dims and zero rows."""
    n, k = 72, 96
    bw = quantize_rtn(torch.randn(n, k), bits)
    g = gl.pack_for_gpu(bw).to(DEVICE)
    x = torch.randn(260, k).to(DEVICE, torch.bfloat16)
    check_close(tq.quant_matmul(x, g), x, bw.dequantize())
    x32 = torch.randn(5, k, device=DEVICE)
    check_close(tq.quant_matmul(x32, g), x32, bw.dequantize())
    wide = torch.randn(4, 2 * k).to(DEVICE, torch.float16)[:, ::2]  # column stride 2
    check_close(tq.quant_matmul(wide, g), wide, bw.dequantize())
    y3 = tq.quant_matmul(wide.reshape(2, 2, k), g)
    assert y3.shape == (2, 2, n) and torch.equal(y3.reshape(4, n), tq.quant_matmul(wide, g))
    assert tq.quant_matmul(x[:0], g).shape == (0, n)
    with pytest.raises(ValueError, match="for a \\[72, 96\\] weight"):
        tq.quant_matmul(torch.randn(2, 64).to(DEVICE, torch.float16), g)


@pytest.mark.parametrize("bits", [4, 8])
def test_rows_independent_of_batch_when_invariant(bits: int) -> None:
    n, k = 40, 96
    g = gl.pack_for_gpu(quantize_rtn(torch.randn(n, k), bits)).to(DEVICE)
    x = torch.randn(37, k).to(DEVICE, torch.bfloat16)
    together = tq.quant_matmul(x, g, batch_invariant=True)
    for rows in (slice(0, 1), slice(5, 6), slice(36, 37), slice(3, 20)):
        assert torch.equal(tq.quant_matmul(x[rows], g, batch_invariant=True), together[rows])


@pytest.mark.parametrize("merged", [False, True])
def test_linear_takes_the_triton_path(monkeypatch, merged: bool) -> None:
    """Through Linear: packed at load, no dense weight kept, quantized bytes reported, and the
    output of dequantize-then-F.linear within the dtype's rounding."""
    monkeypatch.setattr(block_method, "_use_triton", lambda device: True)
    dtype, k = torch.bfloat16, 96
    if merged:
        layer = MergedLinear(
            k, [40, 24], ("gate_proj", "up_proj"), bias=True, dtype=dtype, quant="blocks"
        )
        parts = {
            "gate_proj": checkpoint_weight("Q4_1", 40, k, 1),
            "up_proj": checkpoint_weight("int4", 24, k, 3),
        }
    else:
        layer = Linear(k, 72, bias=True, dtype=dtype, quant="blocks")
        parts = {None: checkpoint_weight("Q8_0", 72, k, 2)}
    layer = layer.to(DEVICE)
    layer.bias.data.normal_()
    for shard, bw in parts.items():
        layer.load_quantized(bw, shard)
    layer.quant_method.process_after_loading(layer)
    method = layer.quant_method
    assert isinstance(method, block_method.BlockQuantMethod) and method.gpu_weight is not None
    assert method.packed is None and "weight" not in layer._parameters
    blocks = [p.unpack() if isinstance(p, QuantizedTensor) else p for p in parts.values()]
    assert layer.weight_bytes == sum(b.nbytes() for b in blocks)
    assert method.describe(layer) == ("Q4_1" if merged else "Q8_0")
    wd = torch.cat([b.dequantize() for b in blocks])  # [N, K] float32
    x = torch.randn(9, k).to(DEVICE, dtype)
    y = layer(x)
    check_close(y, x, wd, layer.bias)
    ref = F.linear(x.float(), wd.to(DEVICE).to(dtype).float(), layer.bias.float())
    assert (y.float() - ref).abs().max() <= 2**-6 * ref.abs().max()
    layer.batch_invariant = True
    assert torch.equal(layer(x)[2:3], layer(x[2:3]))


def test_no_triton_on_cpu_by_default(monkeypatch) -> None:
    assert not block_method._use_triton(torch.device("cpu"))
    monkeypatch.setenv("TOKENMILL_NO_TRITON", "1")
    assert not block_method._use_triton(torch.device("cuda"))


def test_benchmark_tiny() -> None:
    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location(
        "gpu_quant_bench", root / "benchmarks/gpu_quant.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    results = bench.bench_quant_matmul(device=DEVICE.type, tiny=True)
    assert len(results) == len(bench.FORMATS) * len(bench.TINY_SHAPES) * len(bench.TINY_ROWS)
    for entry in results.values():
        assert set(entry) == {"quant", "dense_bf16", "dequant_linear", "max_rel_err"}
        assert entry["max_rel_err"] < 2**-5
        assert all(entry[p]["ms"] > 0 for p in ("quant", "dense_bf16", "dequant_linear"))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("fmt", ["Q4_1", "Q8_0"])
@pytest.mark.parametrize("m", [1, 8, 300])
def test_gpu_llama_shapes(fmt: str, m: int) -> None:
    n, k = 3072, 2048
    bw = block_weights(fmt, n, k, seed=m)
    g = gl.pack_for_gpu(bw).to(DEVICE)
    x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
    check_close(tq.quant_matmul(x, g), x, bw.dequantize())
    assert torch.equal(gl.dequantize_gpu(g).cpu(), bw.dequantize())


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_cuda_graph_capture() -> None:
    bw = block_weights("Q4_0", 2048, 2048)
    g = gl.pack_for_gpu(bw).to(DEVICE)
    x = torch.randn(4, 2048, device=DEVICE, dtype=torch.float16)
    y = tq.quant_matmul(x, g)  # compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_graph = tq.quant_matmul(x, g)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y_graph, tq.quant_matmul(x, g)) and not torch.equal(y_graph, y)
