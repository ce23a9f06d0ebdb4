"""One ragged kernel over the whole batch (the GPU path): Triton, or its PyTorch oracle.

The step is S sequences: every decode row a sequence of one query token, every prompt chunk one
sequence of num_query tokens. Only `max_query_len` (a host int, for the grid) is read on the
host, so the Triton kernel launches without a device sync and can be captured in a CUDA graph.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tokenmill.kernels.attention_ref import reference_paged_attention
from tokenmill.layers.attn_backends.base import (
    AttentionBackend,
    AttentionBatch,
    GraphBuffers,
    host_to_device,
)


@dataclass
class UnifiedAttentionMeta:
    """Sequence i owns query rows [query_start_loc[i], query_start_loc[i + 1]) and seq_lens[i]
    keys (its new tokens' KV already written); query j of it sits at position seq_lens[i] -
    query_len_i + j and attends causally."""

    block_tables: torch.Tensor  # [S, max_blocks] int32; entries past a sequence's end unused
    seq_lens: torch.Tensor  # [S] int32
    query_start_loc: torch.Tensor  # [S + 1] int32
    max_query_len: int


def build_unified_metadata(batch: AttentionBatch) -> UnifiedAttentionMeta:
    block_size, device = batch.block_size, batch.device
    lens: list[int] = []
    query_lens: list[int] = []
    tables: list[list[int]] = []
    for d in batch.decodes:
        for i in range(d.num_rows):
            lens.append(d.num_keys + i)
            query_lens.append(1)
            tables.append(d.block_ids)
    for c in batch.chunks:
        lens.append(c.start_pos + c.num_query)
        query_lens.append(c.num_query)
        tables.append(c.block_ids)
    width = max(-(-n // block_size) for n in lens)
    table = torch.zeros(len(lens), width, dtype=torch.int32)  # [S, max_blocks]
    for i, (ids, n) in enumerate(zip(tables, lens, strict=True)):
        used = -(-n // block_size)
        table[i, :used] = torch.tensor(ids[:used], dtype=torch.int32)
    starts = [0]
    for q in query_lens:
        starts.append(starts[-1] + q)
    return UnifiedAttentionMeta(
        block_tables=host_to_device(table, device, torch.int32),
        seq_lens=host_to_device(lens, device, torch.int32),
        query_start_loc=host_to_device(starts, device, torch.int32),
        max_query_len=max(query_lens),
    )


class UnifiedGraphBuffers(GraphBuffers):
    def __init__(self, max_rows: int, max_blocks: int, null_block: int, device: str) -> None:
        i32 = dict(dtype=torch.int32, device=device)
        self.max_rows = max_rows
        self.max_blocks = max_blocks
        self.null_block = null_block
        self.block_tables = torch.full((max_rows, max_blocks), null_block, **i32)
        self.seq_lens = torch.ones(max_rows, **i32)
        self.query_start_loc = torch.arange(max_rows + 1, **i32)  # one query per row

    def metadata(self, num_rows: int) -> UnifiedAttentionMeta:
        return UnifiedAttentionMeta(
            block_tables=self.block_tables[:num_rows],
            seq_lens=self.seq_lens[:num_rows],
            query_start_loc=self.query_start_loc[: num_rows + 1],
            max_query_len=1,
        )

    def can_hold(self, meta: object, num_rows: int) -> bool:
        return (
            isinstance(meta, UnifiedAttentionMeta)
            and meta.max_query_len == 1
            and num_rows <= self.max_rows
            and meta.block_tables.shape[1] <= self.max_blocks
        )

    def copy_in(self, meta: UnifiedAttentionMeta, num_rows: int, bucket: int) -> None:
        n, width = num_rows, meta.block_tables.shape[1]
        self.block_tables[:n, :width].copy_(meta.block_tables)
        self.seq_lens[:n].copy_(meta.seq_lens)
        # Padding rows attend to the null block's first slot only. A padding row's later table
        # entries may be stale from a bigger step; they are never read.
        self.block_tables[n:bucket, 0].fill_(self.null_block)
        self.seq_lens[n:bucket].fill_(1)


class _UnifiedBackend(AttentionBackend):
    """Both unified backends: the same metadata and graph buffers, one ragged kernel call."""

    _kernel: Callable[..., torch.Tensor]

    def build_metadata(self, batch: AttentionBatch) -> UnifiedAttentionMeta:
        return build_unified_metadata(batch)

    def forward(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: UnifiedAttentionMeta,
        scale: float,
        *,
        window: int | None = None,
        softcap: float | None = None,
    ) -> torch.Tensor:
        return self._kernel(
            q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
            meta.max_query_len, scale, window=window, softcap=softcap,
        )  # fmt: skip

    def graph_buffers(
        self, max_rows: int, max_blocks: int, null_block: int, device: str
    ) -> UnifiedGraphBuffers:
        return UnifiedGraphBuffers(max_rows, max_blocks, null_block, device)


class TritonBackend(_UnifiedBackend):
    name = "triton"
    cuda_graphs = True

    def __init__(self, batch_invariant: bool = False) -> None:
        from tokenmill.kernels.triton_attention import paged_attention  # imports triton

        # The decode path splits long rows over as many programs as fill the GPU, a count that
        # depends on the batch; batch-invariant mode keeps one split per row.
        self._kernel = (
            functools.partial(paged_attention, num_splits=1) if batch_invariant else paged_attention
        )


class UnifiedRefBackend(_UnifiedBackend):
    """The Triton kernel's PyTorch oracle on the same metadata. It reads lengths on the host
    (syncs), so it is never captured; its graph buffers serve padded eager runs in tests."""

    name = "unified-ref"

    def __init__(self) -> None:
        self._kernel = reference_paged_attention
