"""Every C++ CPU kernel gives each row bit-identical results alone and inside batches of any size.

The kernels are built with -march=native, so what the compiler emits differs by CPU model; a row
must still not depend on how many rows share a call (micro-kernels of different widths, loop
remainders, the thread split). Each case therefore uses shapes with tails (K not a multiple of
the vector width, odd numbers of quantization blocks, partial output tiles, contexts past the
attention partition) and compares every row of batches of SIZES rows, rotated so that a row is
probed at several positions, with that row computed alone, on 1 and on 2 threads (PLAN). The
slow test at the end rebuilds the kernels tuned for another CPU model and runs this module
against them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from cpu_kernel_utils import gguf_tensor, make_case

from tokenmill.kernels.cpp_build import BUILD_FLAGS
from tokenmill.kernels.cpu_attention import load_cpu_attention, paged_decode_attention
from tokenmill.kernels.cpu_dense import dense_linear, dense_supported, pack_dense
from tokenmill.kernels.cpu_fused import load_cpu_fused
from tokenmill.kernels.cpu_lut import kernel_lut, load_cpu_lut, lut_linear
from tokenmill.kernels.cpu_quant import grouped_quant_linear, load_cpu_quant, quant_linear
from tokenmill.quant.packing import BlockWeights, pack_tiles, quantize_rtn
from tokenmill.quant.squeezellm import pack_codes

# Batch sizes around every pass width (4 rows for the lookup kernel, 8 for the quantized one),
# the thread split (16 rows per task in the fused ops) and up to 64.
SIZES = (2, 3, 4, 5, 7, 8, 9, 11, 16, 17, 31, 64)
POOL = max(SIZES)  # distinct input rows; batch rows are pool rows
# (threads, batch sizes, rotations): a batch of m rows is pool rows start, start + 1, ... (mod
# POOL). On 2 threads, sizes on both sides of each kernel's parallel split (fewer: a 2-thread
# call on the shared 2-core test machine costs milliseconds).
PLAN = ((1, SIZES, (0, 3)), (2, (9, 64), (5,)))


@contextmanager
def num_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def assert_rows_invariant(run: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """`run(idx)` calls the kernel on the pool rows `idx` (int64 [m]) as one batch and returns
    its output with one leading entry per row. Every row of every batch must equal that row
    computed alone."""
    with num_threads(1):
        alone = torch.cat([run(torch.tensor([i])) for i in range(POOL)])
    for threads, sizes, rotations in PLAN:
        with num_threads(threads):
            for m in sizes:
                for start in rotations:
                    idx = (torch.arange(m) + start) % POOL
                    out = run(idx)
                    expected = alone[idx]
                    if not torch.equal(out, expected):
                        same = [torch.equal(a, b) for a, b in zip(out, expected, strict=True)]
                        pos = same.index(False)
                        raise AssertionError(
                            f"row {int(idx[pos])} differs at position {pos} of a batch of {m} "
                            f"on {threads} thread(s) from the same row alone"
                        )


needs_lut = pytest.mark.skipif(load_cpu_lut() is None, reason="no SqueezeLLM CPU kernel here")
needs_quant = pytest.mark.skipif(load_cpu_quant() is None, reason="no quantized CPU kernel here")
needs_fused = pytest.mark.skipif(load_cpu_fused() is None, reason="no fused CPU ops here")
needs_attention = pytest.mark.skipif(load_cpu_attention() is None, reason="no CPU attention here")


@needs_lut
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# 13: only the masked tail; 47: 32 + 15 (tail in the first accumulator); 61: 32 + 16 + 13 (in
# the second); 290: 9 x 32 + 2; 576: no tail.
@pytest.mark.parametrize("k", [13, 47, 61, 290, 576])
def test_lut_linear(k: int, dtype: torch.dtype) -> None:
    # Random codes and tables (k-means is not what is tested) and ~5% sparse outliers; row 0
    # has none, row 1 one in every column.
    n, g = 37, torch.Generator().manual_seed(k)
    outliers = torch.rand(n, k, generator=g) < 0.05
    outliers[0], outliers[1] = False, True
    rows, cols = outliers.nonzero(as_tuple=True)
    crow = torch.cat([torch.zeros(1, dtype=torch.int64), outliers.sum(1).cumsum(0)])
    args = (
        pack_codes(torch.randint(0, 16, (n, k), generator=g)),
        kernel_lut(torch.randn(n, 16, generator=g).half()),
        crow.int(),
        cols.int(),
        torch.randn(len(rows), generator=g),
    )
    x = torch.randn(POOL, k, generator=g).to(dtype)
    assert_rows_invariant(lambda idx: lut_linear(x[idx], *args))


def block_weight(fmt: str, n: int, k: int):
    """A BlockWeights of `fmt`: a GGUF block format (repacked from gguf's quantization) or
    round-to-nearest int4/int8."""
    if fmt.startswith("Q"):
        return gguf_tensor(fmt, n, k, seed=k)[0].unpack()
    g = torch.Generator().manual_seed(k)
    return quantize_rtn(torch.randn(n, k, generator=g), 4 if fmt == "int4" else 8)


@needs_quant
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [32, 96, 160])  # 1, 3 and 5 blocks of 32
@pytest.mark.parametrize("fmt", ["Q4_0", "Q4_1", "Q8_0", "int4", "int8"])
def test_quant_linear(fmt: str, k: int, dtype: torch.dtype) -> None:
    n = 37  # two full tiles of 16 output rows and a partial one
    bw = block_weight(fmt, n, k)
    packed = pack_tiles(bw)
    x = torch.randn(POOL, k, generator=torch.Generator().manual_seed(k)).to(dtype)
    assert_rows_invariant(lambda idx: quant_linear(x[idx], packed, n, bw.bits))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [13, 96])  # odd K (a half bfloat16 pair); 48 pairs
def test_dense_linear(k: int, dtype: torch.dtype) -> None:
    if not dense_supported(dtype):
        pytest.skip(f"no row-independent {dtype} kernel on this CPU")
    n, g = 70, torch.Generator().manual_seed(k)  # a 4-tile block, then a partial tile
    w, bias = torch.randn(n, k, generator=g).to(dtype), torch.randn(n, generator=g).to(dtype)
    packed = pack_dense(w)
    x = torch.randn(POOL, k, generator=g).to(dtype)
    assert_rows_invariant(lambda idx: dense_linear(x[idx], packed, bias, n))


@needs_quant
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", ["Q4_0", "int8"])
def test_grouped_quant_linear(fmt: str, dtype: torch.dtype) -> None:
    """The expert-grouped kernel: pool row i is routed to expert i % 3 (its own weight); a
    batch's rows are grouped by expert as a MoE layer groups them, so a row is computed with
    the other rows of its expert at some position of the group, or alone."""
    n, k = 37, 96
    # Three different weights (block_weight seeds by k), cut to k columns (3 blocks).
    experts = [block_weight(fmt, n, k + 32 * e) for e in range(3)]
    experts = [BlockWeights(w.q[:, :3], w.d[:, :3], w.m[:, :3], w.bits) for w in experts]
    packed = [pack_tiles(bw) for bw in experts]
    x = torch.randn(POOL, k, generator=torch.Generator().manual_seed(1)).to(dtype)

    def run(idx: torch.Tensor) -> torch.Tensor:
        expert = idx % 3
        order = torch.argsort(expert, stable=True)
        counts = torch.bincount(expert, minlength=3).tolist()
        y = grouped_quant_linear(x[idx[order]], packed, counts, n, experts[0].bits)
        return y[torch.argsort(order)]  # back in the batch's order

    assert_rows_invariant(run)


@needs_attention
@pytest.mark.parametrize(
    ("dtype", "heads", "head_dim"),
    [
        (torch.float32, (9, 3), 64),
        (torch.bfloat16, (9, 3), 64),
        (torch.float16, (9, 3), 64),
        (torch.bfloat16, (8, 2), 128),
        (torch.float32, (6, 2), 96),  # a head_dim without its own instance
        (torch.bfloat16, (8, 1), 96),
    ],
)
def test_paged_decode_attention(dtype: torch.dtype, heads: tuple[int, int], head_dim: int) -> None:
    g = torch.Generator().manual_seed(head_dim)
    lens = torch.randint(1, 200, (POOL,), generator=g)
    lens[::9] += 450  # some rows past the 512-key partition: split and merged
    lens[0], lens[1] = 1, 512
    q, k, v, tables, lens = make_case(
        lens.tolist(), *heads, head_dim, 16, dtype, seed=head_dim, num_layers=1, layer=0
    )
    scale = head_dim**-0.5
    assert_rows_invariant(
        lambda idx: paged_decode_attention(q[idx], k, v, tables[idx], lens[idx], scale)
    )


def bf16_rows(cols: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(POOL, cols, generator=g) * scale).bfloat16()


@needs_fused
@pytest.mark.parametrize("hidden", [70, 576])
@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float32])  # Llama's, Gemma's
def test_add_rms_norm(hidden: int, with_residual: bool, weight_dtype: torch.dtype) -> None:
    ops = load_cpu_fused()
    x, res = bf16_rows(hidden, 1), bf16_rows(hidden, 2) if with_residual else None
    w = bf16_rows(hidden, 3)[0].to(weight_dtype)

    def run(idx: torch.Tensor) -> torch.Tensor:
        out, total = ops.add_rms_norm.default(x[idx], None if res is None else res[idx], w, 1e-5)
        return torch.cat([out, total], dim=1)

    assert_rows_invariant(run)


@needs_fused
@pytest.mark.parametrize("inter", [40, 1536])
@pytest.mark.parametrize("op", ["silu_mul", "gelu_tanh_mul"])
def test_glu_mul(inter: int, op: str) -> None:
    fn = getattr(load_cpu_fused(), op).default
    gate_up = bf16_rows(2 * inter, inter, scale=4.0)
    assert_rows_invariant(lambda idx: fn(gate_up[idx]))


@needs_fused
@pytest.mark.parametrize(("head_dim", "heads", "kv_heads"), [(64, 9, 3), (48, 3, 1)])
def test_rope_cache(head_dim: int, heads: int, kv_heads: int) -> None:
    ops = load_cpu_fused()
    g = torch.Generator().manual_seed(head_dim)
    qkv = bf16_rows((heads + 2 * kv_heads) * head_dim, head_dim)
    cos, sin = torch.randn(2, 300, head_dim, generator=g).bfloat16()
    positions = torch.randint(0, 300, (POOL,), generator=g)
    slots = torch.randperm(4 * 16, generator=g)[:POOL]

    def run(idx: torch.Tensor) -> torch.Tensor:
        # q, and the key and value rows the call wrote into the cache
        k_cache, v_cache = torch.zeros(2, 4, 16, kv_heads, head_dim, dtype=torch.bfloat16)
        q = ops.rope_cache.default(
            qkv[idx], positions[idx], cos, sin, k_cache, v_cache, slots[idx], heads, kv_heads
        )
        written = [c.view(-1, kv_heads * head_dim)[slots[idx]] for c in (k_cache, v_cache)]
        return torch.cat([q.flatten(1), *written], dim=1)

    assert_rows_invariant(run)


@needs_fused
@needs_quant
@needs_attention
@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_decode_layer(family: str) -> None:
    """The whole fused decoder layer (quantized matmuls of 3 and 5 blocks, a qkv bias, rows at
    different positions, each over its own KV blocks); Gemma's with its four float32 norms,
    q/k norms, GeGLU, a soft-cap and a sliding window shorter than most rows."""
    ops = load_cpu_fused()
    hidden, heads, kv_heads, head_dim, inter, block = 96, 6, 2, 32, 160, 16
    g = torch.Generator().manual_seed(0)
    qkv_n = (heads + 2 * kv_heads) * head_dim
    weights = {
        "qkv": (quantize_rtn(torch.randn(qkv_n, hidden, generator=g), 8), qkv_n),
        "o": (gguf_tensor("Q4_1", hidden, heads * head_dim, seed=1)[0].unpack(), hidden),
        "gate_up": (gguf_tensor("Q4_0", 2 * inter, hidden, seed=2)[0].unpack(), 2 * inter),
        "down": (quantize_rtn(torch.randn(hidden, inter, generator=g) * 0.1, 4), hidden),
    }
    packed = {name: (pack_tiles(bw), bw.bits) for name, (bw, _) in weights.items()}
    qkv_bias = torch.randn(qkv_n, generator=g).bfloat16()
    norms = torch.rand(2, hidden, generator=g).bfloat16() + 0.5
    cos, sin = torch.randn(2, 200, head_dim, generator=g).bfloat16()
    # Row r decodes position lens[r] - 1 into the last slot of its own blocks.
    lens = torch.randint(1, 200, (POOL,), generator=g)
    lens[::7] = 160  # a few long rows
    _, k_cache, v_cache, tables, lens = make_case(
        lens.tolist(), heads, kv_heads, head_dim, block, torch.bfloat16, 3, num_layers=1, layer=0
    )
    pos = lens - 1
    slots = tables.gather(1, (pos // block).unsqueeze(1)).squeeze(1) * block + pos % block
    x, residual = bf16_rows(hidden, 4), bf16_rows(hidden, 5)
    gemma: tuple = ()  # the op's defaults: no q/k norms, window, soft-cap, Gemma norms; SwiGLU
    if family == "gemma":
        norms = norms.float()  # 1 + w, multiplied in float32
        qk = torch.rand(2, head_dim, generator=g) + 0.5
        ff = torch.rand(2, hidden, generator=g) + 0.5
        gemma = (qk[0], qk[1], 48, 2.5, ff[0], ff[1], "gelu_tanh")

    def run(idx: torch.Tensor) -> torch.Tensor:
        kc, vc = k_cache.clone(), v_cache.clone()  # each call writes its rows' slots
        out, res = ops.decode_layer.default(
            x[idx], residual[idx], norms[0], norms[1], 1e-5,
            *packed["qkv"], qkv_bias, *packed["o"], *packed["gate_up"], *packed["down"], inter,
            cos, sin, pos[idx], kc, vc, slots[idx], tables[idx], lens[idx], head_dim**-0.5,
            heads, kv_heads, *gemma,
        )  # fmt: skip
        return torch.cat([out, res], dim=1)

    assert_rows_invariant(run)


def other_cpu_tuning() -> str:
    """-mtune for a CPU model unlike this one: its cost model decides differently where to
    vectorise and where to fuse multiply-adds."""
    try:
        amd = "AuthenticAMD" in Path("/proc/cpuinfo").read_text()
    except OSError:
        amd = False
    return "-mtune=icelake-server" if amd else "-mtune=znver3"


@pytest.mark.slow
@pytest.mark.skipif(load_cpu_lut() is None, reason="the C++ kernels cannot be built here")
def test_rows_invariant_when_built_for_another_cpu() -> None:
    """This module again, in a process whose kernels are built tuned for another CPU model: a
    kernel whose rows depend on the batch only through the compiler's choices (implicit fused
    multiply-adds, how a loop remainder is vectorised) fails here on any CPU, not only on the
    one whose compiler happens to choose differently. The build is cached next to the regular
    ones (about a minute the first time, seconds after)."""
    from torch.utils.cpp_extension import get_default_build_root

    assert "-ffp-contract=off" in BUILD_FLAGS and not any("fast-math" in f for f in BUILD_FLAGS)
    tuning = other_cpu_tuning()
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    here = Path(__file__).resolve()
    bootstrap = (
        "import sys, pytest\n"
        "import tokenmill.kernels.build as kb, tokenmill.kernels.cpp_build as b\n"
        f"b.BUILD_FLAGS = (*b.BUILD_FLAGS, {tuning!r})\n"
        "kb.build_all()\n"  # the builds side by side, before the tests load them
        f"sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', '-m', 'not slow', {str(here)!r}]))"
    )
    build_dir = Path(root) / f"tokenmill-tuned-{tuning.removeprefix('-mtune=')}"
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(build_dir)}
    env.pop("TOKENMILL_NO_EXT", None)
    proc = subprocess.run(
        [sys.executable, "-c", bootstrap],
        cwd=here.parents[2],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]
