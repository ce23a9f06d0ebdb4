"""The Triton quantized matmul (kernels/triton_quant.py) against dense bf16 F.linear
and against dequantize-then-F.linear, on Llama-3.2-1B-like shapes (K = 2048; N = 2048 for
q/o, 3072 for q+k+v, 8192 for one of gate/up, 16384 for gate+up), M = 1, 8, 64, 512 rows.

    python benchmarks/gpu_quant.py [--out results/gpu_quant.json]
    python benchmarks/gpu_quant.py --static   # no GPU needed: registers / spills per config

Reports milliseconds per call (CUDA events, median of `iters` after warm-up) and the effective
bandwidth of the weight bytes each path reads (packed bytes for the quantized kernel, bf16 bytes
for the dense ones). `tiny=True` runs small shapes on CPU under Triton's interpreter (a smoke
test of this script; its timings mean nothing).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the tests load this file by path
from common import time_ms  # noqa: E402

FORMATS = {"Q4_1": 4, "Q8_0": 8}  # name -> bits (Q4_0 / int4 read the same bytes as Q4_1)
SHAPES = [(2048, 2048), (3072, 2048), (8192, 2048), (16384, 2048)]  # (N, K)
ROWS = [1, 8, 64, 512]
TINY_SHAPES = [(72, 96)]
TINY_ROWS = [1, 20]


def bench_quant_matmul(device: str = "cuda", tiny: bool = False, iters: int = 50) -> dict:
    """{"Q4_1 N=.. K=.. M=..": {path: {"ms", "weight_GBps"}, "max_rel_err"}} for each format,
    shape and row count; paths: quant (Triton kernel), dense_bf16 (F.linear on a bf16 weight),
    dequant_linear (dequantize_gpu to bf16, then F.linear: the alternative for large M)."""
    dev = torch.device(device)
    if dev.type == "cpu":  # must precede the first import of triton_quant to take effect
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from tokenmill.kernels.triton_quant import interpreted, quant_matmul
    from tokenmill.quant.gpu_layout import dequantize_gpu, pack_for_gpu
    from tokenmill.quant.packing import quantize_rtn

    if dev.type == "cpu" and not interpreted():
        raise RuntimeError("triton_quant was imported without TRITON_INTERPRET=1: no CPU runs")
    shapes, rows = (TINY_SHAPES, TINY_ROWS) if tiny else (SHAPES, ROWS)
    iters = 2 if tiny else iters
    results: dict[str, dict] = {}
    gen = torch.Generator().manual_seed(0)
    for name, bits in FORMATS.items():
        for n, k in shapes:
            w = torch.randn(n, k, generator=gen) * 0.02
            gw = pack_for_gpu(quantize_rtn(w, bits)).to(dev)
            dense = dequantize_gpu(gw, torch.bfloat16)  # [N, K]
            for m in rows:
                x = torch.randn(m, k, generator=gen).to(dev, torch.bfloat16)
                # (callable, weight bytes it reads); defaults bind this iteration's tensors
                paths = {
                    "quant": (lambda x=x, gw=gw: quant_matmul(x, gw), gw.nbytes()),
                    "dense_bf16": (lambda x=x, d=dense: F.linear(x, d), dense.numel() * 2),
                    "dequant_linear": (
                        lambda x=x, gw=gw: F.linear(x, dequantize_gpu(gw, torch.bfloat16)),
                        gw.nbytes(),
                    ),
                }
                entry: dict[str, object] = {}
                for path, (fn, nbytes) in paths.items():
                    ms = time_ms(fn, dev, iters)
                    entry[path] = {"ms": ms, "weight_GBps": nbytes / ms / 1e6}
                ref = F.linear(x.float(), dense.float())
                err = (quant_matmul(x, gw).float() - ref).abs().max() / ref.abs().max()
                entry["max_rel_err"] = err.item()
                results[f"{name} N={n} K={k} M={m}"] = entry
    return results


def static_report(caps: tuple[int, ...] = (80, 90)) -> list[dict]:
    """Compiles the kernel offline (no GPU; triton's bundled ptxas) for every config
    `pick_config` returns on a 132-SM device, for 4 / 8 bits and fp16 / bf16 / fp32 x, and reads
    registers and spill (stack) bytes off the cubin. Shapes are taken 16-divisible, as real
    launches specialize them; without that hint nothing is pipelined."""
    import re
    import subprocess
    import tempfile
    from pathlib import Path

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from tokenmill.kernels import triton_quant as tq

    kernel = tq._quant_matmul_kernel
    names = kernel.arg_names
    cuobjdump = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
    dtypes = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
    configs = {  # (config, x dtype) pairs, each once
        (tq.pick_config(m, n, 2048, dt, torch.device("cpu")), dt): None
        for m in (1, 64, 512)
        for n in (2048, 8192, 16384)
        for dt in dtypes
    }
    report = []
    for cap in caps:
        for bits in (4, 8):
            for cfg, dt in configs:
                xt = dtypes[dt]
                ptrs = {"x_ptr": xt, "w_ptr": "u8", "d_ptr": "fp16", "m_ptr": "fp16"}
                ptrs |= {"bias_ptr": xt, "y_ptr": xt}
                sig = {n: f"*{t}" for n, t in ptrs.items()}
                sig |= {n: "i32" for n in ("M", "N", "NB", "stride_xm", "stride_ym")}
                const = {"stride_xk": 1, "BITS": bits, "HAS_BIAS": True}
                const |= {"FP32_DOT": xt == "fp32", "BLOCK_M": cfg.block_m}
                const |= {"BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k}
                sig |= {n: "constexpr" for n in const}
                sig = {n: sig[n] for n in names}
                div16 = [n for n in names if sig[n][0] == "*" or n in ("N", "NB", "stride_xm")]
                src = ASTSource(
                    fn=kernel,
                    signature=sig,
                    constexprs={(names.index(n),): v for n, v in const.items()},
                    attrs={(names.index(n),): [["tt.divisibility", 16]] for n in div16},
                )
                opts = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
                compiled = triton.compile(src, target=GPUTarget("cuda", cap, 32), options=opts)
                with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                    f.write(compiled.asm["cubin"])
                    f.flush()
                    usage = subprocess.run(
                        [str(cuobjdump), "--dump-resource-usage", f.name],
                        capture_output=True,
                        text=True,
                        check=True,
                    ).stdout
                regs = re.search(r"REG:(\d+)", usage)
                stack = re.search(r"STACK:(\d+)", usage)
                report.append(
                    {
                        "sm": cap,
                        "bits": bits,
                        "x": xt,
                        "config": cfg,
                        "registers": int(regs.group(1)) if regs else None,
                        "spill_bytes": int(stack.group(1)) if stack else None,
                        "shared_bytes": compiled.metadata.shared,
                        "pipelined": "cp.async" in compiled.asm["ptx"],
                    }
                )
    return report


def main() -> None:
    from common import write_results  # benchmarks/ is run as a script folder

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--out", default="benchmarks/results/gpu_quant.json")
    parser.add_argument("--static", action="store_true", help="compile only (no GPU needed)")
    args = parser.parse_args()
    if args.static:
        for row in static_report():
            print(row)
        return
    results = bench_quant_matmul(args.device, iters=args.iters)
    for key, entry in results.items():
        timed = {p: v for p, v in entry.items() if isinstance(v, dict)}
        cells = [f"{p} {v['ms']:.3f} ms {v['weight_GBps']:.0f} GB/s" for p, v in timed.items()]
        print(f"{key:28s} " + " | ".join(cells) + f" | err {entry['max_rel_err']:.1e}")
    write_results(args, results)


if __name__ == "__main__":
    main()
