"""Turns a SchedulerOutput into packed tensors and the attention ForwardContext."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill.core.sched_types import ScheduledSeq
from tokenmill.worker.forward_context import ForwardContext, PrefillSeq


@dataclass
class InputBatch:
    seqs: list[ScheduledSeq]  # in packed order: decodes (and verify seqs) first, then chunks
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    ctx: ForwardContext
    token_starts: list[int]  # first row of each seq


def _slots(block_ids: list[int], start: int, end: int, block_size: int) -> list[int]:
    return [block_ids[p // block_size] * block_size + p % block_size for p in range(start, end)]


def build_input_batch(seqs: list[ScheduledSeq], block_size: int, device: str) -> InputBatch:
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
        num_decode=sum(s.num_tokens for s in decodes),
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
