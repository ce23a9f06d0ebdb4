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


def build_input_batch(
    seqs: list[ScheduledSeq], block_size: int, device: str, backend: AttentionBackend
) -> InputBatch:
    """Packs the step's tokens, decode rows first, and builds `backend`'s attention metadata."""
    # A speculative verify seq (last token + drafts) runs as decode rows, one per token: row i
    # attends to start_pos + i + 1 keys, its own KV being written before attention. So each
    # verified token is computed exactly like a plain decode row (bit-identical with the C++
    # kernel), and all of them share the decode batch's one attention call per layer.
    decodes = [s for s in seqs if s.num_tokens == 1 or s.num_draft_tokens]
    prefills = [s for s in seqs if s.num_tokens > 1 and not s.num_draft_tokens]
    ordered = decodes + prefills
    input_ids: list[int] = []
    positions: list[int] = []
    slot_mapping: list[int] = []
    token_starts: list[int] = []
    for s in ordered:
        token_starts.append(len(input_ids))
        input_ids.extend(s.token_ids)
        end = s.start_pos + s.num_tokens
        positions.extend(range(s.start_pos, end))
        slot_mapping.extend(_slots(s.block_ids, s.start_pos, end, block_size))

    attn_batch = AttentionBatch(
        decodes=[DecodeSeq(s.start_pos + 1, s.num_tokens, s.block_ids) for s in decodes],
        chunks=[
            ChunkSeq(start, s.num_tokens, s.start_pos, s.block_ids)
            for s, start in zip(prefills, token_starts[len(decodes) :], strict=True)
        ],
        block_size=block_size,
        device=device,
    )
    ctx = ForwardContext(
        slot_mapping=host_to_device(slot_mapping, device, torch.int64),
        attn_meta=backend.build_metadata(attn_batch),
    )
    return InputBatch(
        seqs=ordered,
        input_ids=host_to_device(input_ids, device, torch.int64),
        positions=host_to_device(positions, device, torch.int64),
        ctx=ctx,
        token_starts=token_starts,
    )
