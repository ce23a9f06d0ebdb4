"""The C++ CPU backend (csrc/paged_attention.cpp, `kernels.cpu_attention`): decode rows read
their keys straight from the blocks, no gather, no padding. Prompt chunks take the reference
SDPA path, or in batch-invariant mode the tiled chunk kernel, all of a step's chunks in one
call: a token's output is then bit-identical to a decode row's with the same keys, so it does
not depend on how its prompt was chunked, how much of it came from the prefix cache, or which
other requests shared the step (SDPA's reduction order depends on the chunk's length). The
kernels take a sliding window and a logit soft-cap."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill.kernels.cpu_attention import paged_chunk_attention, paged_decode_attention
from tokenmill.layers.attn_backends.base import AttentionBatch
from tokenmill.layers.attn_backends.sdpa import (
    PrefillSeq,
    SdpaBackend,
    SplitAttentionMeta,
    build_split_metadata,
)


@dataclass
class ChunkKernelArgs:
    """The step's prompt chunks as one call of the chunk kernel; their rows follow the decode
    rows in the packed batch, in order."""

    block_tables: torch.Tensor  # [S, max_blocks] int64, padded with 0
    seq_lens: torch.Tensor  # [S] int64: keys of each chunk's sequence, the chunk included
    query_start_loc: torch.Tensor  # [S + 1] int64, from 0: chunk rows after the decode rows


@dataclass
class CpuAttentionMeta(SplitAttentionMeta):
    chunk_args: ChunkKernelArgs | None = None  # batch-invariant mode, where the step has chunks


def build_chunk_args(batch: AttentionBatch) -> ChunkKernelArgs | None:
    if not batch.chunks:
        return None
    bs = batch.block_size
    lens = [c.start_pos + c.num_query for c in batch.chunks]
    width = max(-(-n // bs) for n in lens)
    tables = torch.zeros(len(lens), width, dtype=torch.int64)
    for i, (c, n) in enumerate(zip(batch.chunks, lens, strict=True)):
        used = -(-n // bs)
        tables[i, :used] = torch.tensor(c.block_ids[:used], dtype=torch.int64)
    starts = [0]
    for c in batch.chunks:
        assert c.token_start == batch.num_decode + starts[-1], "chunk rows must follow in order"
        starts.append(starts[-1] + c.num_query)
    return ChunkKernelArgs(
        tables, torch.tensor(lens, dtype=torch.int64), torch.tensor(starts, dtype=torch.int64)
    )


class CpuKernelBackend(SdpaBackend):
    name = "cpu"

    def __init__(self, batch_invariant: bool = False) -> None:
        self.batch_invariant = batch_invariant

    def build_metadata(self, batch: AttentionBatch) -> CpuAttentionMeta:
        split = build_split_metadata(batch)
        chunk_args = build_chunk_args(batch) if self.batch_invariant else None
        return CpuAttentionMeta(**vars(split), chunk_args=chunk_args)

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
        args = meta.chunk_args if isinstance(meta, CpuAttentionMeta) else None
        if args is None:
            return super().forward(q, k_cache, v_cache, meta, scale, window=window, softcap=softcap)
        n = meta.num_decode
        out = torch.empty_like(q)
        if n:
            out[:n] = self.decode(q[:n], k_cache, v_cache, meta, scale, window, softcap)
        out[n:] = paged_chunk_attention(
            q[n:], k_cache, v_cache, args.block_tables, args.seq_lens, args.query_start_loc,
            scale, window, softcap,
        )  # fmt: skip
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
        return paged_decode_attention(
            q, k_cache, v_cache, meta.decode_block_tables, meta.decode_ctx_lens, scale, window,
            softcap,
        )  # fmt: skip

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
        if not self.batch_invariant:
            return super().prefill(q, k_cache, v_cache, p, scale, window, softcap)
        # One chunk alone (forward batches a step's chunks into one call).
        lens = torch.tensor([p.start_pos + p.num_query], dtype=torch.int64)
        starts = torch.tensor([0, p.num_query], dtype=torch.int64)
        return paged_chunk_attention(
            q, k_cache, v_cache, p.block_table.unsqueeze(0), lens, starts, scale, window, softcap
        )

    def decode_kernel_args(
        self, meta: SplitAttentionMeta
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        if meta.prefills or meta.decode_block_tables is None or meta.decode_ctx_lens is None:
            return None
        return meta.decode_block_tables, meta.decode_ctx_lens
