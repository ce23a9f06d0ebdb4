"""The PyTorch oracle of `triton_attention.paged_attention`: the same ragged batch over the paged
cache, one sequence at a time, softmax in fp32. It reads the lengths on the host (syncs), so it
is for tests and `--attention-backend unified-ref`, never for CUDA graphs. No triton needed.
"""

from __future__ import annotations

import math

import torch


def reference_paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    max_query_len: int,
    scale: float,
    out: torch.Tensor | None = None,
    *,
    window: int | None = None,
    softcap: float | None = None,
    **_: object,
) -> torch.Tensor:
    """`paged_attention` in plain PyTorch, one sequence at a time, softmax in fp32 (syncs).
    window: a query at p sees keys (p - window, p] only; softcap: scores -> softcap *
    tanh(scores / softcap) before the softmax."""
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = q.shape[1] // num_kv_heads
    out = torch.empty_like(q) if out is None else out
    starts, lens = query_start_loc.tolist(), seq_lens.tolist()
    for i, seq_len in enumerate(lens):
        a, b = starts[i], starts[i + 1]
        if a == b or seq_len == 0:  # padding, left untouched like the kernels do
            continue
        t = torch.arange(seq_len, device=q.device)
        blocks, offsets = block_tables[i, t // block_size].long(), t % block_size
        keys = k_cache[blocks, offsets].float().repeat_interleave(group, dim=1)  # [n, H, D]
        values = v_cache[blocks, offsets].float().repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[a:b].float(), keys) * scale
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        q_pos = torch.arange(seq_len - (b - a), seq_len, device=q.device)
        hidden = t[None, None, :] > q_pos[None, :, None]
        if window is not None:
            hidden |= t[None, None, :] <= q_pos[None, :, None] - window
        scores.masked_fill_(hidden, -math.inf)
        out[a:b] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), values).to(out.dtype)
    return out
