"""CUDA graphs of the model's forward for decode-only steps, one per bucketed batch size.

A decode step launches hundreds of small kernels; replaying a captured graph launches them all
at once. The graphs read static buffers: each step copies its inputs into the first n rows of
the smallest bucket b >= n, and rows n..b-1 are padding that computes a throw-away token whose
KV goes to the reserved null block (which no request ever owns) and whose attention reads that
block's first key only. A row's result does not depend on what the padding rows hold (every
op of a decode row is row-local), but a matmul may pick another kernel, and so round
differently, for another row count. So the runner pads eager decode steps the same way
(`capture=False`): with `--enforce-eager` only the replay differs and the tokens are identical.

Only the model's forward is captured; logits and sampling stay eager (they run on the rows
that sample, which speculative steps make fewer or more than the decode rows).
`capture=False` runs the same padded buffers eagerly: `--enforce-eager` on the GPU, and the
tests of the padding logic on the CPU.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from tokenmill.layers.attn_backends.base import GraphBuffers
from tokenmill.layers.forward_context import ForwardContext
from tokenmill.worker.input_batch import InputBatch

logger = logging.getLogger(__name__)

Forward = Callable[[torch.Tensor, torch.Tensor, ForwardContext], torch.Tensor]


def graph_buckets(max_batch: int) -> list[int]:
    """Batch sizes with a graph: 1, 2, 4, 8, then every 16 up to max_batch (vLLM's ladder)."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch]
    sizes += list(range(16, max_batch, 16))
    return sorted(set(sizes) | {max_batch})


class DecodeGraphs:
    """`attn`: per KV cache group, the attention backend's static metadata buffers
    (`AttentionBackend.graph_buffers`) with room for the largest bucket, and `null_blocks` that
    group's null block."""

    def __init__(
        self,
        forward: Forward,
        attn: list[GraphBuffers],
        *,
        max_batch: int,
        block_size: int,
        null_blocks: list[int],
        device: str | torch.device,
        capture: bool = True,
    ) -> None:
        self.forward = forward
        self.attn = attn
        self.buckets = graph_buckets(max_batch)
        self.null_slots = [null_block * block_size for null_block in null_blocks]
        rows = self.buckets[-1]
        i64 = dict(dtype=torch.int64, device=device)
        self.input_ids = torch.zeros(rows, **i64)
        self.positions = torch.zeros(rows, **i64)
        self.slot_mappings = [torch.full((rows,), slot, **i64) for slot in self.null_slots]
        self.capture = capture
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        if capture:
            self._capture_all()

    def _ctx(self, n: int) -> ForwardContext:
        return ForwardContext(
            slot_mappings=[slots[:n] for slots in self.slot_mappings],
            attn_metas=[attn.metadata(n) for attn in self.attn],
        )

    @torch.inference_mode()  # as the runner's steps run: no autograd state in the graphs
    def _capture_all(self) -> None:
        pool = None
        # Largest first: the smaller graphs then fit in the memory pool the largest reserved.
        for n in reversed(self.buckets):
            ctx = self._ctx(n)
            for _ in range(2):  # compile the Triton kernels and warm cuBLAS outside the capture
                self.forward(self.input_ids[:n], self.positions[:n], ctx)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self.forward(self.input_ids[:n], self.positions[:n], ctx)
            pool = graph.pool()
            self.graphs[n] = graph
            self.outputs[n] = out
        torch.cuda.synchronize()
        logger.info("captured CUDA graphs for decode batches %s", self.buckets)

    def can_run(self, batch: InputBatch) -> bool:
        n = batch.input_ids.shape[0]
        metas = batch.ctx.attn_metas
        return n <= self.buckets[-1] and all(
            attn.can_hold(meta, n) for attn, meta in zip(self.attn, metas, strict=True)
        )

    def run(self, batch: InputBatch) -> torch.Tensor:
        """The final hidden states [n, hidden] of a decode-only batch (see `can_run`)."""
        n = batch.input_ids.shape[0]
        b = next(size for size in self.buckets if size >= n)
        self.input_ids[:n].copy_(batch.input_ids)
        self.positions[:n].copy_(batch.positions)
        ctx = batch.ctx
        for g, attn in enumerate(self.attn):
            self.slot_mappings[g][:n].copy_(ctx.slot_mappings[g])
            # Padding rows write to the null block (and attend to its first slot only).
            self.slot_mappings[g][n:b].fill_(self.null_slots[g])
            attn.copy_in(ctx.attn_metas[g], n, b)
        if not self.capture:
            return self.forward(self.input_ids[:b], self.positions[:b], self._ctx(b))[:n]
        self.graphs[b].replay()
        return self.outputs[b][:n]
