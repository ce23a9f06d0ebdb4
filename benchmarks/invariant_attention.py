"""Batch-invariant attention for prompt chunks on the CPU: the tiled chunk kernel
(`paged_chunk_attention`) vs the SDPA path the default mode takes vs the decode kernel once per
query token (`paged_prefill_attention`, the batch-invariant path before the chunk kernel).

One chunk of n query tokens at the end of a context of `ctx` keys (ctx - n of them cached).
Shapes are SmolLM2-135M's (H=9, H_kv=3, D=64), block_size 16, block ids shuffled; bf16 cache
by default. Every figure is the minimum over single calls (other load only adds time), in ms.

    python benchmarks/invariant_attention.py [--chunk 16 64 128 256 512] \\
        [--ctx 512 1024 2048 4096] [--dtype bfloat16] [--threads N] [--out results.json]
    python benchmarks/invariant_attention.py --threads 1 --cpu-time   # on a shared host

--quick runs a tiny grid for a smoke test. Where torch's SDPA runs on AMX (bf16 on Sapphire
Rapids and later), ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 shows what it costs on an AVX-512 CPU
without AMX; the chunk kernel never uses AMX.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from attention_cpu import BLOCK, H_KV, D, H, make_cache, reference_prefill
from common import host_info, write_results  # noqa: I001  (benchmarks/ is run as a script folder)

from tokenmill.kernels.cpu_attention import (
    load_cpu_attention,
    paged_chunk_attention,
    paged_prefill_attention,
)

CLOCK = time.perf_counter


def min_ms(fn: Callable[[], torch.Tensor], budget_s: float, max_calls: int) -> float:
    """Minimum ms over single calls, after one warm-up, for up to budget_s or max_calls."""
    fn()
    best, spent, calls = float("inf"), 0.0, 0
    while calls < max_calls and (calls < 3 or spent < budget_s):
        start = CLOCK()
        fn()
        took = CLOCK() - start
        best, spent, calls = min(best, took), spent + took, calls + 1
    return best * 1e3


def bench(num_query: int, ctx: int, dtype: torch.dtype, budget_s: float, per_query: bool) -> dict:
    g = torch.Generator().manual_seed(num_query * 100003 + ctx)
    start = ctx - num_query
    num_blocks = -(-ctx // BLOCK)
    k, v = make_cache(1, num_blocks + 1, dtype, g)[0]
    table = torch.randperm(num_blocks + 1, generator=g)[:num_blocks]
    mask = torch.arange(ctx).unsqueeze(0) <= torch.arange(start, ctx).unsqueeze(1)
    q = torch.randn(num_query, H, D, generator=g).to(dtype)
    scale = D**-0.5
    tables, lens = table.unsqueeze(0), torch.tensor([ctx])
    starts = torch.tensor([0, num_query])

    def chunk() -> torch.Tensor:
        return paged_chunk_attention(q, k, v, tables, lens, starts, scale)

    def sdpa() -> torch.Tensor:
        return reference_prefill(q, k, v, table, mask, scale)

    def old() -> torch.Tensor:
        return paged_prefill_attention(q, k, v, table, start, scale)

    new_out = chunk()
    row = {
        "chunk": num_query,
        "ctx": ctx,
        "max_err_vs_sdpa": (new_out.float() - sdpa().float()).abs().max().item(),
        "chunk_kernel_ms": min_ms(chunk, budget_s, 200),
        "sdpa_ms": min_ms(sdpa, budget_s, 200),
    }
    if per_query:
        assert torch.equal(new_out, old()), "chunk kernel and per-query kernel differ"
        row["per_query_ms"] = min_ms(old, budget_s, 200)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--chunk", type=int, nargs="*", default=[16, 64, 128, 256, 512])
    ap.add_argument("--ctx", type=int, nargs="*", default=[512, 1024, 2048, 4096])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: as is)")
    ap.add_argument("--budget", type=float, default=1.0, help="seconds of calls per figure")
    ap.add_argument("--no-per-query", action="store_true", help="skip the (slow) per-query path")
    ap.add_argument(
        "--cpu-time",
        action="store_true",
        help="time the calling thread's CPU time, not the wall clock (with --threads 1: figures "
        "that other load on a shared host barely moves)",
    )
    ap.add_argument("--quick", action="store_true", help="a tiny grid, for a smoke test")
    ap.add_argument("--out", default=None, help="results JSON")
    args = ap.parse_args()
    if args.quick:
        args.chunk, args.ctx, args.budget = [16, 128], [512], 0.1
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_time:
        if torch.get_num_threads() != 1:
            raise SystemExit("--cpu-time needs --threads 1 (other threads' time is not counted)")
        global CLOCK
        CLOCK = time.thread_time
    if load_cpu_attention() is None:
        raise SystemExit("the C++ extension could not be built; nothing to compare")
    dtype = getattr(torch, args.dtype)
    host = host_info()
    print(f"host: {host['cpu_model']} ({host['cpu_id']}), torch {host['torch']}")
    print(f"H={H} H_kv={H_KV} D={D} block={BLOCK} {args.dtype} threads={torch.get_num_threads()}")
    clock = "thread CPU time" if args.cpu_time else "wall clock"
    print(f"ms per call (minimum, {clock}); ratio = the other path's time / the chunk kernel's")
    print(f"{'n':>4} {'ctx':>5} {'chunk kernel':>13} {'sdpa':>9} {'ratio':>6} {'per-query':>10} "
          f"{'ratio':>6} {'max err':>9}")  # fmt: skip
    rows = []
    for ctx in args.ctx:
        for n in args.chunk:
            if n > ctx:
                continue
            r = bench(n, ctx, dtype, args.budget, not args.no_per_query)
            rows.append(r)
            pq = r.get("per_query_ms")
            pq_text = f"{pq:>10.3f} {pq / r['chunk_kernel_ms']:>5.1f}x" if pq else f"{'-':>17}"
            print(
                f"{n:>4} {ctx:>5} {r['chunk_kernel_ms']:>13.3f} {r['sdpa_ms']:>9.3f} "
                f"{r['sdpa_ms'] / r['chunk_kernel_ms']:>5.2f}x {pq_text} "
                f"{r['max_err_vs_sdpa']:>9.2e}"
            )
    if args.out:
        write_results(args, {"host": host, "dtype": args.dtype, "rows": rows})


if __name__ == "__main__":
    main()
