"""CPU attention over the paged KV cache: the PyTorch reference path vs the C++ kernel.

Decode (default): the reference is what `PagedAttention._decode` does without the extension:
whole blocks gathered with index_select into a padded [B, max_ctx, H_kv, D] tensor, then masked
SDPA. Shapes are SmolLM2-135M's (H=9, H_kv=3, D=64), block_size 16, every row with `ctx` keys,
block ids shuffled. --layers N cycles the calls through N layers of one [L, 2, ...] cache, so a
layer's KV has left the CPU caches by the time it comes back, as in a real step (default 1: the
KV stays cache-warm).

--prefill: one chunk of n query tokens after `ctx` cached ones, `PagedAttention._prefill`
(gather + 4-D SDPA with a causal mask) vs `paged_prefill_attention` (the decode kernel, one
query at a time).

    python benchmarks/attention_cpu.py [--layers 30] [--batch 64 --ctx 192] [--threads 1]
    python benchmarks/attention_cpu.py --prefill [--chunk 1 4 16 64]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from common import host_info  # noqa: I001  (benchmarks/ is run as a script folder)

from tokenmill.kernels.cpu_attention import load_cpu_attention, paged_prefill_attention

H, H_KV, D, BLOCK = 9, 3, 64, 16


def reference_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    tables: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    b, h_kv, d = q.shape[0], k_cache.shape[2], k_cache.shape[3]
    keys = k_cache.index_select(0, tables.reshape(-1)).view(b, -1, h_kv, d).transpose(1, 2)
    values = v_cache.index_select(0, tables.reshape(-1)).view(b, -1, h_kv, d).transpose(1, 2)
    out = F.scaled_dot_product_attention(
        q.unsqueeze(2), keys, values, attn_mask=mask, scale=scale, enable_gqa=True
    )
    return out.squeeze(2)


def reference_prefill(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    table: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    ctx_len, h_kv, d = mask.shape[1], k_cache.shape[2], k_cache.shape[3]
    keys = k_cache.index_select(0, table).view(-1, h_kv, d)[:ctx_len].transpose(0, 1)
    values = v_cache.index_select(0, table).view(-1, h_kv, d)[:ctx_len].transpose(0, 1)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0),
        keys.unsqueeze(0),
        values.unsqueeze(0),
        attn_mask=mask,
        scale=scale,
        enable_gqa=True,
    )
    return out[0].transpose(0, 1)


def time_us(fn: Callable[[int], torch.Tensor], calls: int) -> tuple[float, float]:
    """(min, median) µs of `calls` single calls. The machine may be shared, and other load only
    ever adds time, so the minimum is the figure to compare; the median shows the spread."""
    for i in range(2):
        fn(i)
    times = []
    for i in range(calls):
        start = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - start)
    times.sort()
    return times[0] * 1e6, times[len(times) // 2] * 1e6


def make_cache(
    layers: int, num_blocks: int, dtype: torch.dtype, g: torch.Generator
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    kv = torch.randn(layers, 2, num_blocks, BLOCK, H_KV, D, generator=g).to(dtype)
    return [(kv[i, 0], kv[i, 1]) for i in range(layers)]


def bench_decode(ops, batch: int, ctx: int, layers: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(batch * 100003 + ctx)
    per_row = -(-ctx // BLOCK)
    num_blocks = batch * per_row + 1
    cache = make_cache(layers, num_blocks, dtype, g)
    tables = torch.randperm(num_blocks, generator=g)[: batch * per_row].view(batch, per_row)
    lens = torch.full((batch,), ctx, dtype=torch.int64)
    mask = (torch.arange(per_row * BLOCK) < lens.unsqueeze(1)).view(batch, 1, 1, -1)
    q = torch.randn(batch, H, D, generator=g).to(dtype)
    scale = D**-0.5
    kernel = ops.paged_decode_attention.default

    def ref(i: int) -> torch.Tensor:
        k, v = cache[i % layers]
        return reference_decode(q, k, v, tables, mask, scale)

    def ext(i: int) -> torch.Tensor:
        k, v = cache[i % layers]
        return kernel(q, k, v, tables, lens, scale)

    err = (ref(0).float() - ext(0).float()).abs().max().item()
    calls = max(20, min(400, 20_000_000 // (batch * ctx)))
    return time_us(ref, calls), time_us(ext, calls), err


def bench_prefill(ops, num_query: int, start: int, layers: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(num_query * 100003 + start)
    end = start + num_query
    num_blocks = -(-end // BLOCK)
    cache = make_cache(layers, num_blocks + 1, dtype, g)
    table = torch.randperm(num_blocks + 1, generator=g)[:num_blocks]
    mask = torch.arange(end).unsqueeze(0) <= torch.arange(start, end).unsqueeze(1)
    q = torch.randn(num_query, H, D, generator=g).to(dtype)
    scale = D**-0.5

    def ref(i: int) -> torch.Tensor:
        k, v = cache[i % layers]
        return reference_prefill(q, k, v, table, mask, scale)

    def ext(i: int) -> torch.Tensor:
        k, v = cache[i % layers]
        return paged_prefill_attention(q, k, v, table, start, scale)

    err = (ref(0).float() - ext(0).float()).abs().max().item()
    calls = max(20, min(400, 2_000_000 // (num_query * end)))
    return time_us(ref, calls), time_us(ext, calls), err


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="*", default=[1, 8, 64])
    ap.add_argument("--ctx", type=int, nargs="*", default=[128, 192, 512, 2048])
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: as is)")
    ap.add_argument("--prefill", action="store_true", help="chunks after --ctx cached tokens")
    ap.add_argument("--chunk", type=int, nargs="*", default=[1, 4, 16, 64])
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ops = load_cpu_attention()
    if ops is None:
        raise SystemExit("the C++ extension could not be built; nothing to compare")
    dtype = getattr(torch, args.dtype)
    host = host_info()
    print(f"host: {host['cpu_model']} ({host['cpu_id']}), torch {host['torch']}")
    print(
        f"{'prefill' if args.prefill else 'decode'}: H={H} H_kv={H_KV} D={D} block={BLOCK} "
        f"{args.dtype} layers={args.layers} threads={torch.get_num_threads()}"
    )
    print("µs per call: min (median) over single calls; speedup of the minimums")
    first = "n" if args.prefill else "B"
    print(f"{first:>4} {'ctx':>5} {'reference':>18} {'kernel':>18} {'speedup':>8} {'max err':>9}")
    for a in args.chunk if args.prefill else args.batch:
        for ctx in args.ctx:
            if args.prefill:
                result = bench_prefill(ops, a, ctx, args.layers, dtype)
            else:
                result = bench_decode(ops, a, ctx, args.layers, dtype)
            (ref_min, ref_med), (ext_min, ext_med), err = result
            ref = f"{ref_min:.1f} ({ref_med:.0f})"
            ext = f"{ext_min:.1f} ({ext_med:.0f})"
            print(f"{a:>4} {ctx:>5} {ref:>18} {ext:>18} {ref_min / ext_min:>7.1f}x {err:>9.2e}")


if __name__ == "__main__":
    main()
