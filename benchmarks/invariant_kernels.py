"""Microbenchmark of the row-independent (batch-invariant) matmuls against the default paths.

Per weight shape (in x out, the default model's: attention 576x576, K/V 576x192, gate/up
576x1536, down 1536x576) and row count M:
- quantized (--formats, default Q4_1): the VNNI kernel and, where the CPU has AMX-INT8, its
  bit-identical AMX path (what batch-invariant mode runs from 32 rows there), against what the
  non-invariant mode runs above `block.DENSE_ABOVE_ROWS` rows (dequantize to bfloat16 +
  oneDNN's matmul);
- dense (--dense, default bfloat16 and float32): the row-independent kernel
  (csrc/dense_linear.cpp) against oneDNN on the pre-packed weight (the default mode) and the
  previous batch-invariant path (oneDNN on 16-row tiles).
Each figure is the best of --repeat calls, in ms and GFLOP/s (2 M K N / time).

    python benchmarks/invariant_kernels.py [--threads 2] [--rows 1 8 32 96 256 512]
    python benchmarks/invariant_kernels.py --threads 1 --rows 1 16 64 256 512 --dense --lm-head
    ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 python benchmarks/invariant_kernels.py  # oneDNN w/o AMX
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from common import host_info  # noqa: I001  (benchmarks/ is run as a script folder)

from tokenmill.kernels.cpu_dense import dense_linear, dense_supported, pack_dense
from tokenmill.kernels.cpu_quant import amx_usable, dequantize_packed, load_cpu_quant, quant_linear
from tokenmill.quant.packing import BlockWeights, QuantizedTensor, pack_tiles, quantize_rtn
from tokenmill.quant.unquantized import INVARIANT_TILE

SHAPES = ((576, 576), (576, 192), (576, 1536), (1536, 576))  # (in, out)
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def best_ms(repeat: int, fn: Callable[..., object], *fn_args: object) -> float:
    fn(*fn_args)
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn(*fn_args)
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def block_weight(fmt: str, n: int, k: int) -> BlockWeights:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(n * k))
    if fmt in ("int4", "int8"):
        return quantize_rtn(w, 4 if fmt == "int4" else 8)
    from gguf import GGMLQuantizationType
    from gguf import quants as gguf_quants

    raw = gguf_quants.quantize(w.numpy(), GGMLQuantizationType[fmt])
    return QuantizedTensor(fmt, torch.from_numpy(raw.copy()), (n, k)).unpack()


def dequant_linear(x: torch.Tensor, packed: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    """The default mode's quantized path above DENSE_ABOVE_ROWS rows."""
    return F.linear(x, dequantize_packed(packed, n, bits))


def onednn_packed(w: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The default dense path: oneDNN on a pre-packed weight (unquantized.py), else F.linear."""
    if w.dtype == torch.bfloat16 and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        p = torch.ops.mkldnn._reorder_linear_weight(w, 64)
        return lambda x: torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "")
    return lambda x: F.linear(x, w)


def tiles(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The previous batch-invariant dense path: fixed tiles of INVARIANT_TILE rows."""
    m = x.shape[0]
    pad = -m % INVARIANT_TILE
    if pad:
        x = torch.cat([x, x.new_zeros(pad, x.shape[1])])
    return torch.cat([fn(t) for t in x.split(INVARIANT_TILE)])[:m]


def row(kind: str, k: int, n: int, m: int, times: dict[str, float]) -> dict:
    flops = 2 * m * k * n
    out = {"kind": kind, "in": k, "out": n, "rows": m}
    for name, ms in times.items():
        out[f"{name}_ms"] = round(ms, 4)
        out[f"{name}_gflops"] = round(flops / ms / 1e6, 1)
    cells = "  ".join(
        f"{name} {ms:8.3f} ms {flops / ms / 1e6:7.1f} GF/s" for name, ms in times.items()
    )
    print(f"{kind:9s} {k:5d}x{n:<6d} M={m:<4d} {cells}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32, 96, 256, 512])
    ap.add_argument("--formats", nargs="*", default=["Q4_1"], help="Q4_0 Q4_1 Q8_0 int8 int4")
    ap.add_argument("--dense", nargs="*", default=["bfloat16", "float32"])
    ap.add_argument("--lm-head", action="store_true", help="also 576x49152 (the tied LM head)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default=None, help="write the results JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    shapes = list(SHAPES) + ([(576, 49152)] if args.lm_head else [])
    results = []
    amx = load_cpu_quant() is not None and amx_usable()
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "")
    print(f"threads {args.threads}, ONEDNN_MAX_CPU_ISA={isa}, quant_linear AMX: {amx}")
    r = args.repeat
    for fmt in args.formats if load_cpu_quant() is not None else []:
        for k, n in shapes:
            bw = block_weight(fmt, n, k)
            packed = pack_tiles(bw)
            for m in args.rows:
                x = torch.randn(m, k).bfloat16()
                times = {"vnni": best_ms(r, quant_linear, x, packed, n, bw.bits, "vnni")}
                if amx:
                    times["amx"] = best_ms(r, quant_linear, x, packed, n, bw.bits, "amx")
                times["dequant+onednn"] = best_ms(r, dequant_linear, x, packed, n, bw.bits)
                results.append(row(fmt, k, n, m, times))
    for name in args.dense:
        dtype = DTYPES[name]
        for k, n in shapes:
            w = torch.randn(n, k).to(dtype)
            onednn = onednn_packed(w)
            packed = pack_dense(w) if dense_supported(dtype) else None
            for m in args.rows:
                x = torch.randn(m, k).to(dtype)
                times = {}
                if packed is not None:
                    times["invariant"] = best_ms(r, dense_linear, x, packed, None, n)
                times["onednn"] = best_ms(r, onednn, x)
                times["tiles16"] = best_ms(r, tiles, onednn, x)
                results.append(row(name, k, n, m, times))
    if args.out:
        report = {"host": host_info(), "threads": args.threads, "results": results}
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
