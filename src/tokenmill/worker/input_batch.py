"""Turns a SchedulerOutput into packed tensors and the attention ForwardContext."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill.core.sched_types import ScheduledSeq
from tokenmill.worker.forward_context import ForwardContext, PrefillSeq, UnifiedAttentionMeta


@dataclass
class InputBatch:
    seqs: list[ScheduledSeq]  # in packed order: decodes (and verify seqs) first, then chunks
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    ctx: ForwardContext
    token_starts: list[int]  # first row of each seq


def _slots(block_ids: list[int], start: int, end: int, block_size: int) -> list[int]:
    return [block_ids[p // block_size] * block_size + p % block_size for p in range(start, end)]


def _to_device(values: list[int] | torch.Tensor, device: str, dtype: torch.dtype) -> torch.Tensor:
    t = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if device == "cpu":
        return t
    # Pinned host memory makes the copy asynchronous: no sync per tensor on the GPU path.
    return t.pin_memory().to(device, non_blocking=True)


def build_input_batch(
    seqs: list[ScheduledSeq], block_size: int, device: str, unified: bool = False
) -> InputBatch:
    """Packs the step's tokens. `unified`: attention metadata for one ragged kernel over the
    whole batch (`UnifiedAttentionMeta`, the GPU path) instead of the CPU path's decode tensors
    and per-chunk masks."""
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

    num_decode = sum(s.num_tokens for s in decodes)
    if unified:
        return InputBatch(
            seqs=ordered,
            input_ids=_to_device(input_ids, device, torch.int64),
            positions=_to_device(positions, device, torch.int64),
            ctx=ForwardContext(
                slot_mapping=_to_device(slot_mapping, device, torch.int64),
                num_decode=num_decode,
                decode_block_tables=None,
                decode_mask=None,
                decode_ctx_lens=None,
                prefills=[],
                unified=_unified_meta(decodes, prefills, block_size, device),
            ),
            token_starts=token_starts,
        )

    decode_tables = decode_mask = decode_ctx_lens = None
    if decodes:
        lens = [s.start_pos + i + 1 for s in decodes for i in range(s.num_tokens)]
        num_rows = len(lens)
        ctx_lens = torch.tensor(lens)  # [B]
        width = -(-int(ctx_lens.max()) // block_size)
        tables = torch.zeros(num_rows, width, dtype=torch.int64)  # [B, max_blocks]
        row = 0
        for s in decodes:
            n = min(len(s.block_ids), width)
            tables[row : row + s.num_tokens, :n] = torch.tensor(s.block_ids[:n])
            row += s.num_tokens
        pos = torch.arange(width * block_size)
        mask = pos.unsqueeze(0) < ctx_lens.unsqueeze(1)  # [B, max_blocks * block_size]
        decode_tables = tables.to(device)
        decode_ctx_lens = ctx_lens.to(device)
        decode_mask = mask.view(num_rows, 1, 1, -1).to(device)

    prefill_meta = []
    for s, start in zip(prefills, token_starts[len(decodes) :], strict=True):
        end = s.start_pos + s.num_tokens
        num_blocks = -(-end // block_size)
        table = torch.tensor(s.block_ids[:num_blocks], dtype=torch.int64, device=device)
        q_pos = torch.arange(s.start_pos, end, device=device)
        causal = torch.arange(end, device=device).unsqueeze(0) <= q_pos.unsqueeze(1)
        prefill_meta.append(PrefillSeq(start, s.num_tokens, s.start_pos, table, causal))

    ctx = ForwardContext(
        slot_mapping=torch.tensor(slot_mapping, dtype=torch.int64, device=device),
        num_decode=num_decode,
        decode_block_tables=decode_tables,
        decode_mask=decode_mask,
        decode_ctx_lens=decode_ctx_lens,
        prefills=prefill_meta,
    )
    return InputBatch(
        seqs=ordered,
        input_ids=torch.tensor(input_ids, dtype=torch.int64, device=device),
        positions=torch.tensor(positions, dtype=torch.int64, device=device),
        ctx=ctx,
        token_starts=token_starts,
    )


def _unified_meta(
    decodes: list[ScheduledSeq], prefills: list[ScheduledSeq], block_size: int, device: str
) -> UnifiedAttentionMeta:
    # Decode rows first (a verify seq's tokens each their own one-query sequence, as on the CPU
    # path: a verified token is computed like a plain decode row), then one sequence per chunk.
    lens: list[int] = []
    query_lens: list[int] = []
    tables: list[list[int]] = []
    for s in decodes:
        for i in range(s.num_tokens):
            lens.append(s.start_pos + i + 1)
            query_lens.append(1)
            tables.append(s.block_ids)
    for s in prefills:
        lens.append(s.start_pos + s.num_tokens)
        query_lens.append(s.num_tokens)
        tables.append(s.block_ids)
    width = max(-(-n // block_size) for n in lens)
    table = torch.zeros(len(lens), width, dtype=torch.int32)  # [S, max_blocks]
    for i, (ids, n) in enumerate(zip(tables, lens, strict=True)):
        used = -(-n // block_size)
        table[i, :used] = torch.tensor(ids[:used], dtype=torch.int32)
    starts = [0]
    for q in query_lens:
        starts.append(starts[-1] + q)
    return UnifiedAttentionMeta(
        block_tables=_to_device(table, device, torch.int32),
        seq_lens=_to_device(lens, device, torch.int32),
        query_start_loc=_to_device(starts, device, torch.int32),
        max_query_len=max(query_lens),
    )
