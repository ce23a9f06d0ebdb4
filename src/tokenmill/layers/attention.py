"""Attention over the paged KV cache. The PyTorch reference backend works on CPU and GPU.

The cache of one layer is a pair of flat slot arrays: k_cache, v_cache: [num_slots, H_kv, D],
slot = block_id * block_size + offset. Keys are gathered through the slots, so any block layout
works and nothing is padded to the longest request except inside the decode gather.
"""

from __future__ import annotations

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

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: ForwardContext
    ) -> torch.Tensor:
        # q: [T, H, D]; k, v: [T, H_kv, D] -> out: [T, H, D]
        assert self.k_cache is not None and self.v_cache is not None, "KV cache not bound"
        self.k_cache.index_copy_(0, ctx.slot_mapping, k)
        self.v_cache.index_copy_(0, ctx.slot_mapping, v)
        out = torch.empty_like(q)
        if ctx.num_decode:
            out[: ctx.num_decode] = self._decode(q[: ctx.num_decode], ctx)
        for p in ctx.prefills:
            rows = slice(p.token_start, p.token_start + p.num_query)
            out[rows] = self._prefill(q[rows], p.ctx_slots, p.causal_mask)
        return out

    def _decode(self, q: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        # q: [B, H, D]; keys gathered to [B, max_ctx, H_kv, D], padding masked out.
        keys = self.k_cache[ctx.decode_slots].transpose(1, 2)  # [B, H_kv, max_ctx, D]
        values = self.v_cache[ctx.decode_slots].transpose(1, 2)
        out = F.scaled_dot_product_attention(
            q.unsqueeze(2),
            keys,
            values,
            attn_mask=ctx.decode_mask,
            scale=self.scale,
            enable_gqa=True,
        )  # [B, H, 1, D]
        return out.squeeze(2)

    def _prefill(
        self, q: torch.Tensor, ctx_slots: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        # q: [n, H, D]; keys: [ctx, H_kv, D] (cached prefix + this chunk)
        keys = self.k_cache[ctx_slots].transpose(0, 1)  # [H_kv, ctx, D]
        values = self.v_cache[ctx_slots].transpose(0, 1)
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1), keys, values, attn_mask=mask, scale=self.scale, enable_gqa=True
        )  # [H, n, D]
        return out.transpose(0, 1)
