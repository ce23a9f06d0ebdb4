"""Megatron-style tensor parallelism: how a layer is split over ranks, and the collectives.

Column-parallel linears (q/k/v, gate/up, the LM head) keep a slice of their output rows and need
no communication; row-parallel linears (o_proj, down_proj) keep the matching slice of their
input columns and sum their partial results with one all-reduce. The embedding is split by
vocabulary rows (each rank looks up its own ids, zeros elsewhere, all-reduce); the LM head's
logits are gathered to rank 0, the only rank that samples.

Attention heads and the KV cache are split by KV head (`head_split`: unevenly where N does not
divide the KV heads, with KV heads replicated where N exceeds them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class TensorParallelError(ValueError):
    """A model or world size that cannot be split (the message names the constraint)."""


@dataclass
class TPGroup:
    """This rank's place in the tensor-parallel group; `group` carries the step collectives
    (its timeout bounds how long a step waits for a dead or hung rank). `expert_parallel`:
    MoE layers keep whole experts per rank (layers/expert_parallel.py)."""

    rank: int
    world_size: int
    group: Any = None
    expert_parallel: bool = False

    def startup_barrier(self) -> None:
        """Waits for every rank on the default group (start-up's longer timeout)."""
        dist.barrier()

    def startup_min(self, n: int) -> int:
        """The smallest of every rank's n (start-up, default group)."""
        t = torch.tensor([n], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x, group=self.group)
        return x

    def all_gather_cols(self, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """Every rank: the ranks' column slices of x (rank r's has sizes[r] columns)
        concatenated in rank order."""
        width = max(sizes)
        if x.shape[1] < width:
            x = F.pad(x, (0, width - x.shape[1]))
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x, group=self.group)
        return torch.cat([p[:, :n] for p, n in zip(parts, sizes, strict=True)], dim=1)

    def gather_cols(self, x: torch.Tensor, full: int) -> torch.Tensor:
        """Rank 0: the ranks' column slices of x concatenated (each padded to the same width
        for the collective, trimmed to `full` columns). Other ranks: x itself (unused)."""
        width = -(-full // self.world_size)
        if x.shape[1] < width:
            x = F.pad(x, (0, width - x.shape[1]))
        x = x.contiguous()
        if self.rank == 0:
            parts = [torch.empty_like(x) for _ in range(self.world_size)]
            dist.gather(x, parts, dst=0, group=self.group)
            return torch.cat(parts, dim=1)[:, :full]
        dist.gather(x, None, dst=0, group=self.group)
        return x


def even_split(n: int, parts: int, unit: int = 1) -> list[tuple[int, int]]:
    """[start, end) of each part of n items split in whole `unit`s, the first parts one unit
    larger when they do not divide evenly."""
    units, rem = divmod(n, unit)
    if rem:
        raise TensorParallelError(f"{n} is not a multiple of {unit}")
    base, extra = divmod(units, parts)
    out, start = [], 0
    for p in range(parts):
        size = (base + (p < extra)) * unit
        out.append((start, start + size))
        start += size
    return out


@dataclass(frozen=True)
class HeadShard:
    """The attention heads one rank computes: q heads [q0, q1) and KV heads [kv0, kv1)."""

    q0: int
    q1: int
    kv0: int
    kv1: int

    @property
    def num_heads(self) -> int:
        return self.q1 - self.q0

    @property
    def num_kv_heads(self) -> int:
        return self.kv1 - self.kv0


def head_split(num_heads: int, num_kv_heads: int, world_size: int) -> list[HeadShard]:
    """Each rank's heads. N <= H_kv: KV heads are split as evenly as they go (9 q / 3 KV heads
    over 2 ranks: 6 q + 2 KV and 3 q + 1 KV), each rank taking the q heads of its KV heads.
    N > H_kv: each KV head is replicated on N / H_kv ranks (which must divide), which split
    its group of q heads between them. A rank needs at least one q head."""
    group = num_heads // num_kv_heads
    if world_size <= num_kv_heads:
        return [
            HeadShard(k0 * group, k1 * group, k0, k1)
            for k0, k1 in even_split(num_kv_heads, world_size)
        ]
    if world_size % num_kv_heads or world_size // num_kv_heads > group:
        raise TensorParallelError(
            f"tensor_parallel_size {world_size} cannot split {num_heads} attention heads with "
            f"{num_kv_heads} KV heads: above the KV head count it must be a multiple of it "
            f"({num_kv_heads}) and at most the number of attention heads ({num_heads})"
        )
    reps = world_size // num_kv_heads
    out = []
    for k in range(num_kv_heads):
        for a, b in even_split(group, reps):
            out.append(HeadShard(k * group + a, k * group + b, k, k + 1))
    return out


class RowParallel(nn.Module):
    """A row-parallel linear: this rank's partial y, summed over the ranks."""

    def __init__(self, linear: nn.Module, tp: TPGroup) -> None:
        super().__init__()
        self.linear = linear
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(self.linear(x).contiguous())


class GatherParallel(nn.Module):
    """The exact alternative to `RowParallel` for weights whose kernel quantizes its input
    (the CPU block kernel rounds x to int8 per block of 32): a split-K partial sum rounds
    differently from the whole dot product, and the next layer's int8 rounding can turn
    that last-bit difference into a visible one. Here the layer gathers its whole input,
    computes its share of the output rows over the full K (each output exactly as one rank
    would) and gathers the outputs: two all-gathers instead of one all-reduce."""

    def __init__(
        self, linear: nn.Module, tp: TPGroup, in_sizes: list[int], out_sizes: list[int]
    ) -> None:
        super().__init__()
        self.linear = linear
        self.tp = tp
        self.in_sizes, self.out_sizes = in_sizes, out_sizes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(self.tp.all_gather_cols(x, self.in_sizes))
        return self.tp.all_gather_cols(y, self.out_sizes)


class VocabParallelEmbedding(nn.Module):
    """The embedding rows [start, end) of the vocabulary; the others come from other ranks."""

    def __init__(self, weight: torch.Tensor, start: int, end: int, tp: TPGroup) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight[start:end].clone(), requires_grad=False)
        self.start, self.end = start, end
        self.tp = tp

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mine = (ids >= self.start) & (ids < self.end)
        local = torch.where(mine, ids - self.start, 0)
        x = F.embedding(local, self.weight)
        x = x * mine.unsqueeze(-1).to(x.dtype)  # exact zeros: the sum gives the owner's row
        return self.tp.all_reduce(x)


class VocabParallelHead(nn.Module):
    """A column-parallel LM head: this rank's vocabulary slice of the logits, gathered to
    rank 0 (which gets [rows, vocab]; other ranks get their slice)."""

    def __init__(self, linear: nn.Module, vocab_size: int, tp: TPGroup) -> None:
        super().__init__()
        self.linear = linear
        self.vocab_size = vocab_size
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.gather_cols(self.linear(x), self.vocab_size)
