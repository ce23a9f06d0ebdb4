"""Turns a SchedulerOutput into packed tensors and the step's ForwardContext."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill.core.sched_types import ScheduledSeq
from tokenmill.layers.attn_backends.base import (
    AttentionBackend,
    AttentionBatch,
    ChunkSeq,
    DecodeSeq,
    host_to_device,
)
from tokenmill.layers.forward_context import ForwardContext


@dataclass
class InputBatch:
    seqs: list[ScheduledSeq]  # in packed order: decodes (and verify seqs) first, then chunks
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    ctx: ForwardContext
    token_starts: list[int]  # first row of each seq


def _slots(block_ids: list[int], start: int, end: int, block_size: int) -> list[int]:
    return [block_ids[p // block_size] * block_size + p % block_size for p in range(start, end)]


MAX_RUN_ROWS = 64  # a longer run of output tokens (a recompute) is computed as a chunk


def _decode_rows(s: ScheduledSeq) -> bool:
    if s.num_tokens == 1 or s.num_draft_tokens:
        return True
    req = s.req
    return (
        s.sample
        and req.grammar is not None
        and s.start_pos >= req.num_prompt_tokens
        and s.num_tokens <= MAX_RUN_ROWS
    )


def build_input_batch(
    seqs: list[ScheduledSeq], block_size: int, device: str, backend: AttentionBackend
) -> InputBatch:
    """Packs the step's tokens, decode rows first, and builds `backend`'s attention metadata
    for each KV cache group (the seqs carry a block table per group)."""
    # A speculative verify seq (last token + drafts) runs as decode rows, one per token: row i
    # attends to start_pos + i + 1 keys, its own KV being written before attention. So each
    # verified token is computed exactly like a plain decode row (bit-identical with the C++
    # kernel), and all of them share the decode batch's one attention call per layer.
    # A forced run (a constrained request's sampled token and the tokens its grammar forced
    # after it: output tokens only) runs as decode rows too, like a verify seq whose drafts
    # need no verification: the step keeps the decode path (one attention call, the fused
    # layer on a CPU), and each forced token's KV is computed as a decode row computes it.
    decodes = [s for s in seqs if _decode_rows(s)]
    prefills = [s for s in seqs if not _decode_rows(s)]
    ordered = decodes + prefills
    num_groups = len(ordered[0].block_ids) if ordered else 1
    input_ids: list[int] = []
    positions: list[int] = []
    slot_mappings: list[list[int]] = [[] for _ in range(num_groups)]
    token_starts: list[int] = []
    for s in ordered:
        token_starts.append(len(input_ids))
        input_ids.extend(s.token_ids)
        end = s.start_pos + s.num_tokens
        positions.extend(range(s.start_pos, end))
        for slots, table in zip(slot_mappings, s.block_ids, strict=True):
            slots.extend(_slots(table, s.start_pos, end, block_size))

    chunk_starts = token_starts[len(decodes) :]
    metas = []
    for g in range(num_groups):
        attn_batch = AttentionBatch(
            decodes=[DecodeSeq(s.start_pos + 1, s.num_tokens, s.block_ids[g]) for s in decodes],
            chunks=[
                ChunkSeq(start, s.num_tokens, s.start_pos, s.block_ids[g])
                for s, start in zip(prefills, chunk_starts, strict=True)
            ],
            block_size=block_size,
            device=device,
        )
        metas.append(backend.build_metadata(attn_batch))
    ctx = ForwardContext(
        slot_mappings=[host_to_device(slots, device, torch.int64) for slots in slot_mappings],
        attn_metas=metas,
    )
    return InputBatch(
        seqs=ordered,
        input_ids=host_to_device(input_ids, device, torch.int64),
        positions=host_to_device(positions, device, torch.int64),
        ctx=ctx,
        token_starts=token_starts,
    )
