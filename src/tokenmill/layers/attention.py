"""The attention layer of a model: owns its slice of the paged KV cache and hands the work to the
runner's attention backend (`attn_backends`), which it never inspects."""

from __future__ import annotations

import torch
from torch import nn

from tokenmill.layers.attn_backends.base import AttentionBackend
from tokenmill.layers.forward_context import ForwardContext


class PagedAttention(nn.Module):
    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        scale: float | None = None,
        sliding_window: int | None = None,
        softcap: float | None = None,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5 if scale is None else scale
        # keys at positions (p - sliding_window, p] only; None: all of them
        self.sliding_window = sliding_window
        self.softcap = softcap  # scores -> softcap * tanh(scores / softcap); None: none
        # bound by the model runner (`bind`)
        self.backend: AttentionBackend | None = None
        self.k_cache: torch.Tensor | None = None  # [num_blocks, block_size, H_kv, D]
        self.v_cache: torch.Tensor | None = None
        self.kv_group = 0  # the KV cache group whose slots and block tables this layer reads

    def bind(
        self,
        backend: AttentionBackend,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        kv_group: int = 0,
    ) -> None:
        self.backend = backend
        self.k_cache = k_cache
        self.v_cache = v_cache
        self.kv_group = kv_group

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor | None,
        v: torch.Tensor | None,
        ctx: ForwardContext,
    ) -> torch.Tensor:
        # q: [T, H, D]; k, v: [T, H_kv, D] (None: the caller already wrote them to the cache)
        # -> out: [T, H, D]
        backend, k_cache, v_cache = self.backend, self.k_cache, self.v_cache
        assert backend is not None and k_cache is not None and v_cache is not None, "not bound"
        if k is not None and v is not None:
            backend.write_kv(k, v, k_cache, v_cache, ctx.slot_mappings[self.kv_group])
        return backend.forward(
            q, k_cache, v_cache, ctx.attn_metas[self.kv_group], self.scale,
            window=self.sliding_window, softcap=self.softcap,
        )  # fmt: skip
