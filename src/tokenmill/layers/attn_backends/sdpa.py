"""The PyTorch reference backend (CPU and GPU), and the metadata it shares with the C++ kernel.

Decode rows gather their keys through the block tables into one padded batch and run one SDPA
with a mask; each prompt chunk runs one SDPA over its cached prefix plus the chunk, causal with
an offset. Keys are gathered a whole block at a time (contiguous copies, ~3x faster than a
per-token gather); only the decode gather pads to the longest row, and the mask hides it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokenmill.layers.attn_backends.base import AttentionBackend, AttentionBatch


@dataclass
class PrefillSeq:
    """A chunk's rows and the keys they read."""

    token_start: int  # first row of this request in the packed token batch
    num_query: int
    start_pos: int  # tokens already in the KV cache before this step
    block_table: torch.Tensor  # [ceil((start_pos + num_query) / block_size)] int64
    causal_mask: torch.Tensor  # [num_query, start_pos + num_query] bool, True = attend


@dataclass
class SplitAttentionMeta:
    """Decode rows as one padded batch, then each prompt chunk on its own."""

    num_decode: int  # rows [0, num_decode) are decode rows
    decode_block_tables: torch.Tensor | None  # [num_decode, max_blocks] int64, padded with 0
    decode_mask: torch.Tensor | None  # [num_decode, 1, 1, max_ctx] bool, True = attend
    decode_ctx_lens: torch.Tensor | None  # [num_decode] int64, keys per decode row
    prefills: list[PrefillSeq]


def build_split_metadata(batch: AttentionBatch) -> SplitAttentionMeta:
    block_size, device = batch.block_size, batch.device
    tables = mask = ctx_lens = None
    if batch.decodes:
        lens = [d.num_keys + i for d in batch.decodes for i in range(d.num_rows)]
        num_rows = len(lens)
        host_lens = torch.tensor(lens)  # [B]
        width = -(-int(host_lens.max()) // block_size)
        host_tables = torch.zeros(num_rows, width, dtype=torch.int64)  # [B, max_blocks]
        row = 0
        for d in batch.decodes:
            n = min(len(d.block_ids), width)
            host_tables[row : row + d.num_rows, :n] = torch.tensor(d.block_ids[:n])
            row += d.num_rows
        pos = torch.arange(width * block_size)
        host_mask = pos.unsqueeze(0) < host_lens.unsqueeze(1)  # [B, max_blocks * block_size]
        tables = host_tables.to(device)
        ctx_lens = host_lens.to(device)
        mask = host_mask.view(num_rows, 1, 1, -1).to(device)
    prefills = []
    for c in batch.chunks:
        end = c.start_pos + c.num_query
        num_blocks = -(-end // block_size)
        table = torch.tensor(c.block_ids[:num_blocks], dtype=torch.int64, device=device)
        q_pos = torch.arange(c.start_pos, end, device=device)
        causal = torch.arange(end, device=device).unsqueeze(0) <= q_pos.unsqueeze(1)
        prefills.append(PrefillSeq(c.token_start, c.num_query, c.start_pos, table, causal))
    return SplitAttentionMeta(batch.num_decode, tables, mask, ctx_lens, prefills)


class SdpaBackend(AttentionBackend):
    name = "sdpa"

    def build_metadata(self, batch: AttentionBatch) -> SplitAttentionMeta:
        return build_split_metadata(batch)

    def forward(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: SplitAttentionMeta,
        scale: float,
        *,
        window: int | None = None,
        softcap: float | None = None,
    ) -> torch.Tensor:
        # q: [T, H, D] -> out: [T, H, D]
        out = torch.empty_like(q)
        n = meta.num_decode
        if n:
            out[:n] = self.decode(q[:n], k_cache, v_cache, meta, scale, window, softcap)
        for p in meta.prefills:
            rows = slice(p.token_start, p.token_start + p.num_query)
            out[rows] = self.prefill(q[rows], k_cache, v_cache, p, scale, window, softcap)
        return out

    def decode(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: SplitAttentionMeta,
        scale: float,
        window: int | None = None,
        softcap: float | None = None,
    ) -> torch.Tensor:
        # q: [B, H, D]; keys gathered to [B, max_ctx, H_kv, D], padding masked out.
        tables, mask, lens = meta.decode_block_tables, meta.decode_mask, meta.decode_ctx_lens
        assert tables is not None and mask is not None and lens is not None
        if window is not None:  # row b's query sits at lens[b] - 1: keys [lens[b] - window, ..)
            pos = torch.arange(mask.shape[-1], device=mask.device)
            mask = mask & (pos >= (lens - window).view(-1, 1, 1, 1))
        keys = _gather(k_cache, tables).transpose(1, 2)  # [B, H_kv, max_ctx, D]
        values = _gather(v_cache, tables).transpose(1, 2)
        out = _attend(q.unsqueeze(2), keys, values, mask, scale, softcap)  # [B, H, 1, D]
        return out.squeeze(2)

    def prefill(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        p: PrefillSeq,
        scale: float,
        window: int | None = None,
        softcap: float | None = None,
    ) -> torch.Tensor:
        # q: [n, H, D]; keys: [ctx, H_kv, D] (cached prefix + this chunk). 4-D inputs take
        # torch's CPU flash kernel; 3-D ones fall back to the ~7x slower math path.
        mask = p.causal_mask  # [n, ctx]
        ctx_len = mask.shape[1]
        if window is not None:
            q_pos = torch.arange(p.start_pos, ctx_len, device=mask.device)
            k_pos = torch.arange(ctx_len, device=mask.device)
            mask = mask & (k_pos.unsqueeze(0) > q_pos.unsqueeze(1) - window)
        keys = _gather(k_cache, p.block_table)[:ctx_len].transpose(0, 1)  # [H_kv, ctx, D]
        values = _gather(v_cache, p.block_table)[:ctx_len].transpose(0, 1)
        out = _attend(
            q.transpose(0, 1).unsqueeze(0),
            keys.unsqueeze(0),
            values.unsqueeze(0),
            mask,
            scale,
            softcap,
        )  # [1, H, n, D]
        return out[0].transpose(0, 1)


def _attend(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
    softcap: float | None,
) -> torch.Tensor:
    # q: [B, H, n, D]; keys, values: [B, H_kv, ctx, D]; mask broadcasts to [B, H, n, ctx]
    # (True = attend) -> [B, H, n, D]
    if softcap is None:
        return F.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask, scale=scale, enable_gqa=True
        )
    # SDPA cannot cap the scores, so a math path: explicit scores in fp32.
    group = q.shape[1] // keys.shape[1]
    k = keys.float().repeat_interleave(group, dim=1)  # [B, H, ctx, D]
    v = values.float().repeat_interleave(group, dim=1)
    scores = (q.float() @ k.transpose(-1, -2)) * scale  # [B, H, n, ctx]
    scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~mask, -math.inf)
    return (scores.softmax(-1) @ v).to(q.dtype)


def _gather(cache: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    # cache: [num_blocks, block_size, H_kv, D]; tables: [..., n] block ids
    # -> [..., n * block_size, H_kv, D]
    blocks = cache.index_select(0, tables.reshape(-1))
    return blocks.view(*tables.shape[:-1], -1, *cache.shape[2:])
