"""The C++ CPU backend (csrc/paged_attention.cpp, `kernels.cpu_attention`): decode rows read
their keys straight from the blocks, no gather, no padding. Prompt chunks take the reference
SDPA path, or in batch-invariant mode the kernel once per query token, so that a token's output
does not depend on how its prompt was chunked or how much of it came from the prefix cache
(SDPA's reduction order depends on the chunk's length). The kernel takes a sliding window and
a logit soft-cap."""

from __future__ import annotations

import torch

from tokenmill.kernels.cpu_attention import paged_decode_attention, paged_prefill_attention
from tokenmill.layers.attn_backends.sdpa import PrefillSeq, SdpaBackend, SplitAttentionMeta


class CpuKernelBackend(SdpaBackend):
    name = "cpu"

    def __init__(self, batch_invariant: bool = False) -> None:
        self.batch_invariant = batch_invariant

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
        return paged_prefill_attention(
            q, k_cache, v_cache, p.block_table, p.start_pos, scale, window, softcap
        )

    def decode_kernel_args(
        self, meta: SplitAttentionMeta
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        if meta.prefills or meta.decode_block_tables is None or meta.decode_ctx_lens is None:
            return None
        return meta.decode_block_tables, meta.decode_ctx_lens
