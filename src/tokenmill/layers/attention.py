"""Attention over the paged KV cache. The PyTorch reference backend works on CPU and GPU.

The cache of one layer is a pair of block arrays: k_cache, v_cache: [num_blocks, block_size,
H_kv, D]; token t of a request lives in block table[t // block_size] at offset t % block_size
(its slot: block_id * block_size + offset). Keys are gathered a whole block at a time (contiguous
copies, ~3x faster than a per-token gather here); only the decode gather pads to the longest
request, and the mask hides the padding.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.worker.forward_context import ForwardContext


class PagedAttention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5
        self.k_cache: torch.Tensor | None = None  # bound by the model runner
        self.v_cache: torch.Tensor | None = None
        # The C++ paged decode kernel (csrc/paged_attention.cpp) when the runner could build it:
        # it reads keys straight from the blocks, no gather, no padding.
        self.decode_kernel: Callable[..., torch.Tensor] | None = None
        # Its per-query form for prompt chunks (batch-invariant mode): each query token computed
        # exactly like a decode row, so a token's output does not depend on how its prompt was
        # chunked or how much of it came from the prefix cache. SDPA's reduction order depends on
        # the chunk's length.
        self.prefill_kernel: Callable[..., torch.Tensor] | None = None
        # One ragged kernel for the whole batch (the GPU path: triton_attn.paged_attention, or
        # its PyTorch reference), used when the context carries `unified` metadata.
        self.unified_kernel: Callable[..., torch.Tensor] | None = None

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor | None,
        v: torch.Tensor | None,
        ctx: ForwardContext,
    ) -> torch.Tensor:
        # q: [T, H, D]; k, v: [T, H_kv, D] (None: the caller already wrote them to the cache)
        # -> out: [T, H, D]
        assert self.k_cache is not None and self.v_cache is not None, "KV cache not bound"
        if k is not None and v is not None:
            num_heads_kv, head_dim = self.num_kv_heads, self.head_dim
            self.k_cache.view(-1, num_heads_kv, head_dim).index_copy_(0, ctx.slot_mapping, k)
            self.v_cache.view(-1, num_heads_kv, head_dim).index_copy_(0, ctx.slot_mapping, v)
        if ctx.unified is not None:
            assert self.unified_kernel is not None, "unified metadata without a unified kernel"
            m = ctx.unified
            return self.unified_kernel(
                q, self.k_cache, self.v_cache, m.block_tables, m.seq_lens, m.query_start_loc,
                m.max_query_len, self.scale,
            )  # fmt: skip
        out = torch.empty_like(q)
        if ctx.num_decode:
            out[: ctx.num_decode] = self._decode(q[: ctx.num_decode], ctx)
        for p in ctx.prefills:
            rows = slice(p.token_start, p.token_start + p.num_query)
            if self.prefill_kernel is not None:
                out[rows] = self.prefill_kernel(
                    q[rows], self.k_cache, self.v_cache, p.block_table, p.start_pos, self.scale
                )
            else:
                out[rows] = self._prefill(q[rows], p.block_table, p.causal_mask)
        return out

    def _gather(self, cache: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
        # tables: [..., n] block ids -> [..., n * block_size, H_kv, D]
        blocks = cache.index_select(0, tables.reshape(-1))
        return blocks.view(*tables.shape[:-1], -1, self.num_kv_heads, self.head_dim)

    def _decode(self, q: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        # q: [B, H, D]; keys gathered to [B, max_ctx, H_kv, D], padding masked out.
        tables = ctx.decode_block_tables
        if self.decode_kernel is not None:
            return self.decode_kernel(
                q, self.k_cache, self.v_cache, tables, ctx.decode_ctx_lens, self.scale
            )
        keys = self._gather(self.k_cache, tables).transpose(1, 2)  # [B, H_kv, max_ctx, D]
        values = self._gather(self.v_cache, tables).transpose(1, 2)
        out = F.scaled_dot_product_attention(
            q.unsqueeze(2),
            keys,
            values,
            attn_mask=ctx.decode_mask,
            scale=self.scale,
            enable_gqa=True,
        )  # [B, H, 1, D]
        return out.squeeze(2)

    def _prefill(self, q: torch.Tensor, table: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # q: [n, H, D]; keys: [ctx, H_kv, D] (cached prefix + this chunk). 4-D inputs take
        # torch's CPU flash kernel; 3-D ones fall back to the ~7x slower math path.
        ctx_len = mask.shape[1]
        keys = self._gather(self.k_cache, table)[:ctx_len].transpose(0, 1)  # [H_kv, ctx, D]
        values = self._gather(self.v_cache, table)[:ctx_len].transpose(0, 1)
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0),
            keys.unsqueeze(0),
            values.unsqueeze(0),
            attn_mask=mask,
            scale=self.scale,
            enable_gqa=True,
        )  # [1, H, n, D]
        return out[0].transpose(0, 1)
