"""The Triton paged attention (attn_backends/triton_attn.py) against its PyTorch oracle
`reference_paged_attention`: decode rows, prompt chunks and both mixed with cached prefixes,
GQA ratios 1 / 3 / 4, head_dim 64 / 128 (and padded odd ones), the split-K decode path, q as a
strided view of a fused qkv output, out=, padding rows, and block tables whose unused tail
points at the null block 0.

Without CUDA the kernels run on CPU tensors under Triton's interpreter: TRITON_INTERPRET=1 must
be set before the kernels are defined (the module is reloaded if something imported it first);
the kernels call no @jit helper of triton.language, so triton itself may have been imported
earlier in the process (checked in a fresh interpreter by test_interpreter_after_late_env).

Tolerances: fp32 accumulates in fp32 like the oracle (atol 2e-5). bf16 outputs are rounded to
bf16 (up to one unit in the last place, 2^-7 relative, the interpreter truncates) and on a GPU
the softmax weights are rounded to bf16 before the P @ V product (another ~2^-8 relative).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from utils_triton import CUDA, interpreted, run_after_late_env  # sets TRITON_INTERPRET first

pytest.importorskip("triton")

from tokenmill.kernels import triton_attention as ta  # noqa: E402

ta = interpreted(ta)

DEVICE = torch.device("cuda" if CUDA else "cpu")
ROOT = Path(__file__).resolve().parents[2]
TOLERANCES = {
    torch.float32: {"atol": 2e-5, "rtol": 2e-5},
    torch.bfloat16: {"atol": 2**-7, "rtol": 2**-6},
    torch.float16: {"atol": 2**-10, "rtol": 2**-9},
}

# name -> (query_len, cached keys before the queries) per sequence
BATCHES = {
    "decode": ([1, 1, 1, 1], [0, 15, 16, 70]),  # 1 key; a block boundary either side; 5 blocks
    "prefill": ([5, 33], [0, 0]),
    "mixed": ([1, 12, 1, 40], [63, 17, 20, 5]),  # decode rows and chunks after a cached prefix
}


def make_case(
    query_lens: list[int],
    ctx_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    block_size: int = 16,
    seed: int = 0,
    spare_rows: int = 0,
) -> dict:
    """paged_attention's arguments as a dict. q: [T, H, D] is the first H * D columns of a fused
    [T + spare_rows, (H + 2 H_kv) * D] qkv output; k_cache, v_cache: layer 1 of a
    [2, 2, num_blocks, block_size, H_kv, D] cache; block ids shuffled, block 0 never used, and
    each table padded with 0 (the null block) to one more block than the longest sequence."""
    g = torch.Generator().manual_seed(seed)
    seq_lens = [c + n for c, n in zip(ctx_lens, query_lens, strict=True)]
    per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(per_seq) + 2
    kv = torch.randn(2, 2, num_blocks, block_size, num_kv_heads, head_dim, generator=g)
    kv = kv.to(DEVICE, dtype)
    ids = torch.randperm(num_blocks - 1, generator=g) + 1
    tables = torch.zeros(len(seq_lens), max(per_seq) + 1, dtype=torch.int32)
    start = 0
    for i, n in enumerate(per_seq):
        tables[i, :n] = ids[start : start + n]
        start += n
    num_tokens = sum(query_lens)
    width = (num_heads + 2 * num_kv_heads) * head_dim
    qkv = torch.randn(num_tokens + spare_rows, width, generator=g).to(DEVICE, dtype)
    q = qkv[:num_tokens, : num_heads * head_dim].view(num_tokens, num_heads, head_dim)
    qsl = torch.tensor([0] + query_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return dict(
        q=q,
        k_cache=kv[1, 0],
        v_cache=kv[1, 1],
        block_tables=tables.to(DEVICE),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        query_start_loc=qsl.to(DEVICE),
        max_query_len=max(query_lens),
        scale=head_dim**-0.5,
    )


def check(case: dict, out: torch.Tensor | None = None, **kwargs: object) -> torch.Tensor:
    """Runs the kernel, compares it with the oracle (fp32 output), returns the kernel's output."""
    got = ta.paged_attention(**case, out=out, **kwargs)
    q = case["q"]
    features = {k: kwargs[k] for k in ("window", "softcap") if k in kwargs}
    ref = ta.reference_paged_attention(
        **case, out=torch.empty(q.shape, device=q.device), **features
    )
    assert got.shape == q.shape and got.dtype == q.dtype
    torch.testing.assert_close(got.float(), ref, **TOLERANCES[q.dtype])
    return got


@pytest.mark.skipif(CUDA, reason="the interpreter is only used without CUDA")
def test_runs_under_the_interpreter() -> None:
    assert ta.interpreted(), "kernels compiled for a GPU: TRITON_INTERPRET=1 came too late"


LATE_ENV_SCRIPT = """
import os
import torch, triton  # triton first, then the variable
os.environ["TRITON_INTERPRET"] = "1"
from tokenmill.kernels import triton_attention as ta
assert ta.interpreted()
k_cache, v_cache = torch.randn(2, 8, 16, 2, 32).unbind(0)
case = dict(q=torch.randn(7, 4, 32), k_cache=k_cache, v_cache=v_cache,
            block_tables=torch.tensor([[2, 1, 5, 7, 6, 0], [3, 0, 0, 0, 0, 0]], dtype=torch.int32),
            seq_lens=torch.tensor([70, 6], dtype=torch.int32),
            query_start_loc=torch.tensor([0, 1, 7], dtype=torch.int32), max_query_len=6,
            scale=0.2)
ref = ta.reference_paged_attention(**case)
torch.testing.assert_close(ta.paged_attention(**case), ref, atol=2e-5, rtol=2e-5)
decode = {**case, "q": case["q"][:2], "max_query_len": 1,
          "query_start_loc": torch.tensor([0, 1, 2], dtype=torch.int32)}
ref = ta.reference_paged_attention(**decode)
torch.testing.assert_close(ta.paged_attention(**decode, num_splits=2), ref, atol=2e-5, rtol=2e-5)
"""


@pytest.mark.skipif(CUDA, reason="the interpreter is only used without CUDA")
def test_interpreter_after_late_env() -> None:
    """triton imported before TRITON_INTERPRET was set (as another test module may do)."""
    proc = run_after_late_env(LATE_ENV_SCRIPT)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(4, 4), (9, 3), (8, 2)])
@pytest.mark.parametrize("batch", list(BATCHES))
def test_matches_reference(batch: str, num_heads: int, num_kv_heads: int, dtype) -> None:
    query_lens, ctx_lens = BATCHES[batch]
    check(make_case(query_lens, ctx_lens, num_heads, num_kv_heads, 64, dtype, seed=num_heads))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", ["decode", "mixed"])
def test_head_dim_128(batch: str, dtype: torch.dtype) -> None:
    query_lens, ctx_lens = BATCHES[batch]
    check(make_case(query_lens, ctx_lens, 8, 2, 128, dtype))


@pytest.mark.parametrize(("head_dim", "block_size"), [(48, 32), (80, 8), (16, 16)])
def test_odd_head_dims_and_block_sizes(head_dim: int, block_size: int) -> None:
    """head_dim padded to a power of two; key tiles spanning several blocks or a part of one."""
    query_lens, ctx_lens = BATCHES["mixed"]
    check(make_case(query_lens, ctx_lens, 6, 2, head_dim, torch.float32, block_size))


@pytest.mark.parametrize("num_splits", [None, 1, 3, 8])
def test_decode_split_k(num_splits: int | None) -> None:
    """Flash-decoding: up to 300 keys (tables of 320) in ranges of split_size keys, a multiple
    of 64: 3 asked -> 3 of 128, 8 asked -> 5 of 64 (the shorter rows leave some empty); None
    picks 3 here, as 3 sequences x 1 KV head fill few programs. MQA: 3 heads, 1 KV head."""
    case = make_case([1, 1, 1], [299, 40, 150], 3, 1, 64, torch.float32)
    check(case, num_splits=num_splits)
    check(case, num_splits=num_splits, max_seq_len=300)  # the tightest bound


@pytest.mark.parametrize(("window", "softcap"), [(1, None), (7, None), (40, None), (None, 1.5),
                                                 (20, 2.0)])  # fmt: skip
@pytest.mark.parametrize("batch", ["decode", "mixed"])
def test_window_and_softcap(batch: str, window: int | None, softcap: float | None) -> None:
    """Sliding windows shorter than a query block, than a key tile and longer than some rows,
    and soft-capped scores (scale 1, so that the cap bites), against the oracle."""
    query_lens, ctx_lens = BATCHES[batch]
    case = make_case(query_lens, ctx_lens, 8, 2, 64, torch.float32, seed=5)
    case["scale"] = 1.0
    got = check(case, window=window, softcap=softcap)
    plain = ta.reference_paged_attention(**case, out=torch.empty_like(got))
    assert (got - plain).abs().max() > 1e-2  # the features changed the result


@pytest.mark.parametrize("window", [1, 30, 100, 400])
def test_window_split_k(window: int) -> None:
    """Split-K decode with a window: splits wholly before the window are skipped by the
    attention kernel and by the merge; a window longer than every row changes nothing."""
    case = make_case([1, 1, 1], [299, 40, 150], 4, 2, 64, torch.float32, seed=6)
    check(case, num_splits=5, window=window)
    check(case, num_splits=3, window=window, softcap=3.0)


def test_split_k_bf16() -> None:
    check(make_case([1, 1], [200, 7], 8, 2, 64, torch.bfloat16), num_splits=4)


@pytest.mark.parametrize("num_splits", [None, 4])  # None: the general kernel for query_len 3
def test_padding_rows_untouched(num_splits: int | None) -> None:
    """A padded batch (as under a CUDA graph): a sequence with no queries, one with queries but
    no keys (its rows: 1 .. 1 + query_len), and rows of q past query_start_loc[-1]. Their out
    rows are left as they were."""
    query_len = 1 if num_splits else 3
    lens = [query_len, 0, query_len, query_len]
    case = make_case(lens, [50, 9, 0, 20], 4, 2, 32, torch.float32, seed=3)
    case["seq_lens"][2] = 0
    pad = 5
    rows = case["q"].shape[0]
    padding = torch.zeros(rows + pad, dtype=torch.bool)
    padding[query_len : 2 * query_len] = True
    padding[rows:] = True
    q = torch.randn(rows + pad, 4, 32, device=DEVICE)
    q[:rows] = case["q"]
    case["q"] = q
    out = torch.full_like(q, float("nan"))
    ta.paged_attention(**case, out=out, num_splits=num_splits)
    assert out[padding].isnan().all()
    ref = ta.reference_paged_attention(**case, out=torch.full_like(q, float("nan")))
    assert ref[padding].isnan().all()
    torch.testing.assert_close(out[~padding], ref[~padding], atol=2e-5, rtol=2e-5)


def test_layouts_and_out() -> None:
    """A contiguous q gives the same result as the strided view; out may be a strided view; the
    cache may be laid out [num_blocks, 2, block_size, H_kv, D] (k and v interleaved per block)."""
    case = make_case([1, 9, 1], [30, 20, 0], 9, 3, 64, torch.bfloat16, spare_rows=2)
    assert not case["q"].is_contiguous()
    buf = torch.zeros(case["q"].shape[0], 9, 80, device=DEVICE, dtype=torch.bfloat16)
    out = buf[:, :, 8:72]
    assert check(case, out=out) is out
    assert (buf[:, :, :8] == 0).all() and (buf[:, :, 72:] == 0).all()
    contiguous = ta.paged_attention(**{**case, "q": case["q"].contiguous()})
    assert torch.equal(contiguous, out)
    check({**case, "max_query_len": 64})  # an upper bound is enough (it only sizes tiles)
    interleaved = torch.stack([case["k_cache"], case["v_cache"]], dim=1)
    moved = {**case, "k_cache": interleaved[:, 0], "v_cache": interleaved[:, 1]}
    assert torch.equal(ta.paged_attention(**moved), out)


def test_supports_and_errors() -> None:
    assert ta.supports(64, torch.bfloat16) and ta.supports(128, torch.float16)
    assert ta.supports(80, torch.float32) and ta.supports(256, torch.bfloat16)
    assert not ta.supports(8, torch.float32) and not ta.supports(512, torch.float32)
    assert not ta.supports(64, torch.float64) and not ta.supports(64, torch.int8)
    case = make_case([1], [3], 4, 2, 8, torch.float32)
    with pytest.raises(ValueError, match="head_dim"):
        ta.paged_attention(**case)
    case = make_case([1], [3], 4, 2, 16, torch.float32)
    with pytest.raises(ValueError, match="contiguous"):
        q = torch.randn(1, 4, 32, device=DEVICE)[:, :, ::2]  # [1, 4, 16], stride 2
        ta.paged_attention(**{**case, "q": q})
    with pytest.raises(ValueError, match="heads"):
        ta.paged_attention(**{**case, "q": case["q"][:, :3]})


def test_benchmark_tiny() -> None:
    spec = importlib.util.spec_from_file_location(
        "gpu_attention_bench", ROOT / "benchmarks/gpu_attention.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    results = bench.benchmark_paged_attention(device=DEVICE.type, tiny=True)
    assert set(results) == set(bench.TINY)
    for name, entry in results.items():
        assert entry["triton"]["ms"] > 0 and entry["sdpa_gather"]["ms"] > 0
        assert ("triton_no_split" in entry) == name.startswith("decode")
        assert entry["max_abs_err"] < 2**-5


COMPILE_SCRIPT = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from tokenmill.kernels import triton_attention as ta

def signature(fn, dtype, consts):
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in ("part_acc_ptr", "part_ml_ptr"):
            sig[name] = "*fp32"
        elif name in ("block_tables_ptr", "seq_lens_ptr", "query_start_loc_ptr"):
            sig[name] = "*i32"
        elif name.endswith("_ptr"):
            sig[name] = "*" + dtype
        else:
            sig[name] = "fp32" if name in ("qk_scale", "softcap") else "i32"
    return sig

target = GPUTarget("cuda", 90, 32)
for dtype, split, block_m, block_n, warps in (("bf16", 0, 64, 64, 4), ("fp32", 1, 16, 32, 8)):
    consts = dict(NUM_HEADS=12, HEAD_DIM=80, BLOCK_D=128, GROUP=3, BLOCK_M=block_m,
                  BLOCK_Q=block_m // 3, BLOCK_N=block_n, BLOCK_SIZE=16, SPLIT=bool(split),
                  DOT_PRECISION="ieee" if dtype == "fp32" else None, UPCAST=False,
                  SOFTCAP=bool(split))  # each path, one with the soft-cap, one without
    src = ASTSource(ta._attn_kernel, signature(ta._attn_kernel, dtype, consts), consts)
    assert triton.compile(src, target=target, options={"num_warps": warps}).asm["cubin"]
consts = dict(NUM_HEADS=12, HEAD_DIM=80, BLOCK_D=128, SPLITS_P2=4)
src = ASTSource(ta._reduce_kernel, signature(ta._reduce_kernel, "bf16", consts), consts)
assert triton.compile(src, target=target, options={"num_warps": 4}).asm["cubin"]
"""


@pytest.mark.skipif(CUDA, reason="the GPU tests run the compiled kernels themselves")
def test_kernels_compile_for_sm90() -> None:
    """Compiles both kernels to an sm_90 cubin without a GPU (Triton's own ptxas): catches what
    the interpreter lets through (types across the binary search loop, int64 offsets...)."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", COMPILE_SCRIPT], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_llama_shapes(head_dim: int, dtype: torch.dtype) -> None:
    """Llama-3.2-1B-like heads: decode rows with up to 2k keys, and chunks up to 700 tokens."""
    decode = make_case([1] * 40, [17 * i + 3 for i in range(40)], 32, 8, head_dim, dtype)
    check(decode)
    check(decode, num_splits=1)
    check(decode, num_splits=6)
    mixed = make_case([1, 700, 1, 129, 64], [2000, 0, 5, 300, 1000], 32, 8, head_dim, dtype)
    check(mixed)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("max_query_len", [1, 16])
def test_gpu_cuda_graph(max_query_len: int) -> None:
    """Captured once, replayed after the device-side lengths and tables change."""
    case = make_case([max_query_len] * 8, [500] * 8, 32, 8, 64, torch.bfloat16)
    out = torch.empty_like(case["q"])
    ta.paged_attention(**case, out=out)  # compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ta.paged_attention(**case, out=out)
    ctx = [30 * i for i in range(8)]  # shorter: fewer blocks, fewer splits with keys
    new = make_case([max_query_len] * 8, ctx, 32, 8, 64, torch.bfloat16, seed=1)
    for name in ("seq_lens", "query_start_loc"):
        case[name].copy_(new[name])
    case["block_tables"][:, : new["block_tables"].shape[1]].copy_(new["block_tables"])
    case["q"].copy_(new["q"])
    case["k_cache"][: new["k_cache"].shape[0]].copy_(new["k_cache"])
    case["v_cache"][: new["v_cache"].shape[0]].copy_(new["v_cache"])
    graph.replay()
    ref = ta.reference_paged_attention(**case, out=torch.empty(out.shape, device=DEVICE))
    torch.testing.assert_close(out.float(), ref, **TOLERANCES[torch.bfloat16])
