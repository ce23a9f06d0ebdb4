"""The Triton paged attention (kernels/triton_attention.py) against the PyTorch path
that `PagedAttention` takes without it (whole blocks gathered with index_select, then SDPA),
on a Llama-3.2-1B-like layer (H=32, H_kv=8, D=64, bf16, block_size 16, shuffled blocks):
decode of batch 1 / 64 / 256 with 1024 keys each, and a prefill of 8 prompts of 512 tokens.

    python benchmarks/gpu_attention.py [--out results/gpu_attention.json]

Reports milliseconds per call (CUDA events, median of `iters` after warm-up), the KV bytes read
per second by the Triton kernel, and its max abs error against the fp32 oracle
`reference_paged_attention`. `tiny=True` runs small shapes on CPU under Triton's interpreter (a
smoke test of this script; its timings mean nothing).
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

H, H_KV, D, BLOCK = 32, 8, 64, 16
# name -> (query tokens per sequence, cached keys before them, sequences)
CASES = {
    "decode b=1 ctx=1024": (1, 1023, 1),
    "decode b=64 ctx=1024": (1, 1023, 64),
    "decode b=256 ctx=1024": (1, 1023, 256),
    "prefill 8x512": (512, 0, 8),
}
TINY = {"decode b=3 ctx=40": (1, 39, 3), "prefill 2x24": (24, 0, 2)}
TINY_HEADS = (4, 2, 16)  # H, H_kv, D


def _sdpa_baseline(
    q: torch.Tensor,  # [S * n, H, D]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    tables: torch.Tensor,  # [S, blocks]
    num_query: int,
    num_keys: int,
    scale: float,
) -> torch.Tensor:
    """All sequences alike (n queries after num_keys - n cached keys): one batched gather and
    SDPA, as PagedAttention does for decode; for prefill it loops per prompt, so this is a
    lower bound on its time."""
    s, (h_kv, d) = tables.shape[0], k_cache.shape[2:]
    keys = k_cache.index_select(0, tables.reshape(-1)).view(s, -1, h_kv, d)  # [S, ctx, H_kv, D]
    values = v_cache.index_select(0, tables.reshape(-1)).view(s, -1, h_kv, d)
    keys, values = keys[:, :num_keys].transpose(1, 2), values[:, :num_keys].transpose(1, 2)
    pos = torch.arange(num_keys - num_query, num_keys, device=q.device)
    mask = torch.arange(num_keys, device=q.device)[None, :] <= pos[:, None]  # [n, keys]
    qb = q.view(s, num_query, q.shape[1], q.shape[2]).transpose(1, 2)  # [S, H, n, D]
    out = F.scaled_dot_product_attention(
        qb, keys, values, attn_mask=mask, scale=scale, enable_gqa=True
    )
    return out.transpose(1, 2).reshape(q.shape)


def benchmark_paged_attention(device: str = "cuda", tiny: bool = False, iters: int = 50) -> dict:
    """{case: {"triton": {"ms", "kv_GBps"}, "sdpa_gather": {"ms"}, "max_abs_err"}}, plus
    "triton_no_split": {"ms"} for decode cases (num_splits=1: no flash-decoding split)."""
    dev = torch.device(device)
    if dev.type == "cpu":  # must precede the first import of triton_attention to take effect
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from tokenmill.kernels.triton_attention import (
        interpreted,
        paged_attention,
        reference_paged_attention,
    )

    if dev.type == "cpu" and not interpreted():
        raise RuntimeError("triton_attention was imported without TRITON_INTERPRET=1: no CPU runs")
    cases, (h, h_kv, d) = (TINY, TINY_HEADS) if tiny else (CASES, (H, H_KV, D))
    iters = 2 if tiny else iters
    dtype, scale = torch.bfloat16, d**-0.5
    gen = torch.Generator().manual_seed(0)
    dev_gen = torch.Generator(device=dev).manual_seed(0)  # the b=256 cache is 0.5 GB
    results: dict[str, dict] = {}
    for name, (n, ctx, s) in cases.items():
        keys = ctx + n
        per_seq = -(-keys // BLOCK)
        num_blocks = s * per_seq + 1  # block 0 unused, as in the runner
        kv = torch.randn(2, num_blocks, BLOCK, h_kv, d, generator=dev_gen, device=dev, dtype=dtype)
        tables = (torch.randperm(num_blocks - 1, generator=gen) + 1)[: s * per_seq]
        tables = tables.view(s, per_seq).to(dev, torch.int32)
        q = torch.randn(s * n, h, d, generator=gen).to(dev, dtype)
        seq_lens = torch.full((s,), keys, dtype=torch.int32, device=dev)
        qsl = torch.arange(0, s * n + 1, n, dtype=torch.int32, device=dev)
        args = (q, kv[0], kv[1], tables, seq_lens, qsl, n, scale)
        out = torch.empty_like(q)
        t_ms = time_ms(lambda args=args, out=out: paged_attention(*args, out=out), dev, iters)
        b_ms = time_ms(
            lambda q=q, kv=kv, t=tables, n=n, k=keys: _sdpa_baseline(
                q, kv[0], kv[1], t, n, k, scale
            ),
            dev,
            iters,
        )
        if n == 1:  # the split-K decode path vs one program per (sequence, kv head)
            one = time_ms(
                lambda a=args, o=out: paged_attention(*a, out=o, num_splits=1), dev, iters
            )
            results[name] = {"triton_no_split": {"ms": one}}
        ref = reference_paged_attention(*args, out=torch.empty(q.shape, device=dev))
        err = (paged_attention(*args).float() - ref).abs().max().item()
        kv_bytes = 2 * s * keys * h_kv * d * kv.element_size()
        results.setdefault(name, {}).update(
            {
                "triton": {"ms": t_ms, "kv_GBps": kv_bytes / t_ms / 1e6},
                "sdpa_gather": {"ms": b_ms},
                "max_abs_err": err,
            }
        )
    return results


def main() -> None:
    from common import write_results  # benchmarks/ is run as a script folder

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--out", default="benchmarks/results/gpu_attention.json")
    args = parser.parse_args()
    results = benchmark_paged_attention(args.device, iters=args.iters)
    for name, entry in results.items():
        tri, base = entry["triton"], entry["sdpa_gather"]
        one = (
            f" (no split {entry['triton_no_split']['ms']:.3f})"
            if "triton_no_split" in entry
            else ""
        )
        print(
            f"{name:24s} triton {tri['ms']:.3f} ms{one} ({tri['kv_GBps']:.0f} GB/s KV) | "
            f"gather+sdpa {base['ms']:.3f} ms | err {entry['max_abs_err']:.1e}"
        )
    write_results(args, results)


if __name__ == "__main__":
    main()
