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

from tokenmill.worker.forward_context import ForwardContext, UnifiedAttentionMeta
from tokenmill.worker.input_batch import InputBatch

logger = logging.getLogger(__name__)

Forward = Callable[[torch.Tensor, torch.Tensor, ForwardContext], torch.Tensor]


def graph_buckets(max_batch: int) -> list[int]:
    """Batch sizes with a graph: 1, 2, 4, 8, then every 16 up to max_batch (vLLM's ladder)."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch]
    sizes += list(range(16, max_batch, 16))
    return sorted(set(sizes) | {max_batch})


class DecodeGraphs:
    def __init__(
        self,
        forward: Forward,
        *,
        max_batch: int,
        max_blocks: int,
        block_size: int,
        null_block: int,
        device: str | torch.device,
        capture: bool = True,
    ) -> None:
        self.forward = forward
        self.buckets = graph_buckets(max_batch)
        self.max_blocks = max_blocks
        self.null_block = null_block
        self.null_slot = null_block * block_size
        rows = self.buckets[-1]
        i64, i32 = dict(dtype=torch.int64, device=device), dict(dtype=torch.int32, device=device)
        self.input_ids = torch.zeros(rows, **i64)
        self.positions = torch.zeros(rows, **i64)
        self.slot_mapping = torch.full((rows,), self.null_slot, **i64)
        self.block_tables = torch.full((rows, max_blocks), null_block, **i32)
        self.seq_lens = torch.ones(rows, **i32)
        self.query_start_loc = torch.arange(rows + 1, **i32)  # one query per row
        self.capture = capture
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        if capture:
            self._capture_all()

    def _ctx(self, n: int) -> ForwardContext:
        meta = UnifiedAttentionMeta(
            block_tables=self.block_tables[:n],
            seq_lens=self.seq_lens[:n],
            query_start_loc=self.query_start_loc[: n + 1],
            max_query_len=1,
        )
        return ForwardContext(
            slot_mapping=self.slot_mapping[:n],
            num_decode=n,
            decode_block_tables=None,
            decode_mask=None,
            decode_ctx_lens=None,
            prefills=[],
            unified=meta,
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
        meta = batch.ctx.unified
        return (
            meta is not None
            and meta.max_query_len == 1
            and batch.input_ids.shape[0] <= self.buckets[-1]
            and meta.block_tables.shape[1] <= self.max_blocks
        )

    def run(self, batch: InputBatch) -> torch.Tensor:
        """The final hidden states [n, hidden] of a decode-only batch (see `can_run`)."""
        meta = batch.ctx.unified
        assert meta is not None
        n = batch.input_ids.shape[0]
        b = next(size for size in self.buckets if size >= n)
        width = meta.block_tables.shape[1]
        self.input_ids[:n].copy_(batch.input_ids)
        self.positions[:n].copy_(batch.positions)
        self.slot_mapping[:n].copy_(batch.ctx.slot_mapping)
        self.block_tables[:n, :width].copy_(meta.block_tables)
        self.seq_lens[:n].copy_(meta.seq_lens)
        # Padding rows: write to the null block and attend to its first slot only. A padding
        # row's later table entries may be stale from a bigger step; they are never read.
        self.slot_mapping[n:b].fill_(self.null_slot)
        self.block_tables[n:b, 0].fill_(self.null_block)
        self.seq_lens[n:b].fill_(1)
        if not self.capture:
            return self.forward(self.input_ids[:b], self.positions[:b], self._ctx(b))[:n]
        self.graphs[b].replay()
        return self.outputs[b][:n]
