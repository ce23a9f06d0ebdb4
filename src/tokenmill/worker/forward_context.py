"""Per-step attention metadata, built once by the model runner and shared by every layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PrefillSeq:
    """A request with several query tokens this step (a prompt chunk, or tokens after resume)."""

    token_start: int  # first row of this request in the packed token batch
    num_query: int
    start_pos: int  # tokens already in the KV cache before this step
    block_table: torch.Tensor  # [ceil((start_pos + num_query) / block_size)] int64
    causal_mask: torch.Tensor  # [num_query, start_pos + num_query] bool, True = attend


@dataclass
class UnifiedAttentionMeta:
    """The whole batch as S sequences for one ragged attention kernel (the GPU path).

    Every decode row is a sequence of one query token; a prompt chunk is one sequence of
    num_query tokens. Sequence i owns query rows [query_start_loc[i], query_start_loc[i + 1])
    and seq_lens[i] keys (its new tokens' KV already written); query j of it sits at position
    seq_lens[i] - query_len_i + j and attends causally. Only `max_query_len` (a host int, for
    the grid) is read on the host, so the kernel launch needs no device sync.
    """

    block_tables: torch.Tensor  # [S, max_blocks] int32; entries past a sequence's end unused
    seq_lens: torch.Tensor  # [S] int32
    query_start_loc: torch.Tensor  # [S + 1] int32
    max_query_len: int


@dataclass
class ForwardContext:
    """Ragged, padding-free batch: decode rows first, then prefill rows, concatenated.

    slot_mapping[i] is the cache slot (block_id * block_size + offset) that token i writes.
    The CPU path reads the decode_* fields and `prefills`; the GPU path reads `unified`.
    """

    slot_mapping: torch.Tensor  # [num_tokens] int64
    num_decode: int  # rows [0, num_decode) are decode rows (single tokens, verified drafts)
    decode_block_tables: torch.Tensor | None  # [num_decode, max_blocks] int64, padded with 0
    decode_mask: torch.Tensor | None  # [num_decode, 1, 1, max_ctx] bool, True = attend
    decode_ctx_lens: torch.Tensor | None  # [num_decode] int64, keys per decode row
    prefills: list[PrefillSeq]
    unified: UnifiedAttentionMeta | None = None
