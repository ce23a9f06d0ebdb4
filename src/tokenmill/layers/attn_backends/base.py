"""The interface of attention over the paged KV cache, and the step description it is built from.

A backend is chosen once per model runner (`select_backend`) and bound to every attention layer.
Each step, the runner describes the batch (`AttentionBatch`: decode rows first, then prompt
chunks, packed without padding) and the backend turns it into its own metadata once
(`build_metadata`); every layer then calls `forward` with that metadata. Models never see which
backend runs or what its metadata holds. A backend that can run under CUDA graphs also gives
static metadata buffers for the graphs to read (`graph_buffers`).

The cache of one layer is a pair of block arrays, k_cache and v_cache: [num_blocks, block_size,
H_kv, D]; token t of a request lives in block table[t // block_size] at offset t % block_size
(its slot: block_id * block_size + offset).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class DecodeSeq:
    """`num_rows` one-token rows of a request: a decode, or a speculative verify (the last token
    and its drafts). Row i attends to num_keys + i keys (its own KV included), so every verified
    token is computed exactly like a plain decode row."""

    num_keys: int
    num_rows: int
    block_ids: list[int]


@dataclass(frozen=True)
class ChunkSeq:
    """A request with several query tokens this step (a prompt chunk, or tokens after resume):
    queries at positions start_pos .. start_pos + num_query - 1, attending causally."""

    token_start: int  # its first row in the packed batch
    num_query: int
    start_pos: int  # tokens already in the KV cache before this step
    block_ids: list[int]


@dataclass(frozen=True)
class AttentionBatch:
    """One step's attention work: decode rows first (rows 0 .. num_decode - 1), then chunks."""

    decodes: list[DecodeSeq]
    chunks: list[ChunkSeq]
    block_size: int
    device: str

    @property
    def num_decode(self) -> int:
        return sum(d.num_rows for d in self.decodes)


def host_to_device(
    values: list[int] | torch.Tensor, device: str, dtype: torch.dtype
) -> torch.Tensor:
    """A host list or tensor on `device`; off the CPU through pinned memory, so the copy is
    asynchronous (no sync per tensor on the GPU path)."""
    t = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if device == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)


class GraphBuffers(ABC):
    """Static attention metadata for CUDA graphs of decode-only steps: up to `max_rows` rows.

    A replay reads the first b rows; the step's n real rows are copied in and rows n .. b - 1
    are padding that attends to the null block's first slot only."""

    @abstractmethod
    def metadata(self, num_rows: int) -> Any:
        """The metadata over the first num_rows rows (views of the static buffers)."""

    @abstractmethod
    def can_hold(self, meta: Any, num_rows: int) -> bool:
        """Whether a step's metadata fits the buffers (decode rows only, table not too wide)."""

    @abstractmethod
    def copy_in(self, meta: Any, num_rows: int, bucket: int) -> None:
        """Copies a step's metadata into rows 0 .. num_rows - 1 and pads up to `bucket`."""


class AttentionBackend(ABC):
    name: str
    cuda_graphs = False  # whether its forward can be captured in a CUDA graph (no host syncs)

    @abstractmethod
    def build_metadata(self, batch: AttentionBatch) -> Any:
        """This backend's metadata for one step, built once and read by every layer."""

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: Any,
        scale: float,
        *,
        window: int | None = None,
        softcap: float | None = None,
    ) -> torch.Tensor:
        """Causal attention of q [T, H, D] over the cache, whose KV for this step's tokens is
        already written; returns [T, H, D].

        scale multiplies q.k. window (a sliding-window layer): a query at position p sees only
        keys at positions (p - window, p], the last `window` including itself (transformers'
        rule for Mistral, Qwen2 and Gemma alike). softcap (Gemma 2): scores become
        softcap * tanh(scores / softcap) before the softmax. Both are per layer (the layer
        passes them), so one step's metadata serves windowed and global layers alike."""

    def write_kv(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        """Writes k, v [T, H_kv, D] to their slots."""
        num_kv_heads, head_dim = k_cache.shape[-2:]
        k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k)
        v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v)

    def graph_buffers(
        self, max_rows: int, max_blocks: int, null_block: int, device: str
    ) -> GraphBuffers | None:
        """Static metadata buffers for decode steps padded to a CUDA graph's batch size (captured
        only where `cuda_graphs`), or None where this backend has no such layout."""
        return None

    def decode_kernel_args(self, meta: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(block_tables [B, max_blocks] int64, ctx_lens [B] int64) when the step has decode rows
        only and this backend runs the C++ decode kernel, which a fused decoder layer can then
        call itself; else None."""
        return None
