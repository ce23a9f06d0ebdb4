"""Expert parallelism under tensor parallelism: each rank keeps whole experts, an even
contiguous share of every MoE layer's (rank r: experts [e0, e1) of `even_split`), and no
intra-expert split, so quantized experts keep every block as stored.

Dispatch and combine: tensor parallelism replicates the step's tokens on every rank (the hidden
states after each all-reduce are the same everywhere), so the dispatch is local: every rank runs
the (replicated) router on all tokens, and its `Experts` sees the pairs routed to other ranks'
experts under the id `len(experts)`, which it drops. Each rank's partial output holds, per token,
the weighted sum of its own experts' outputs (zeros elsewhere), and one all-reduce (sum) over the
ranks combines them before the (replicated) shared expert is added. An all-to-all dispatch only
pays where tokens are sharded across ranks (data parallelism), which tensor parallelism is not.

Exactness: a token's top-k outputs are summed per rank in ascending expert order, then across
ranks. With top-2 routing (Mixtral) this is TP=1's sum bit for bit at any rank count: at most
two partials are non-zero (one output each, or one holding both outputs' sum), and x + 0 and
a + b are exact whatever the order. With top-k > 2 a token's outputs can split into groups
whose sums associate differently from TP=1's ascending sum: the last bits can differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from tokenmill.layers.tensor_parallel import TensorParallelError, TPGroup, even_split

if TYPE_CHECKING:
    from tokenmill.layers.moe import SparseMoeBlock


@dataclass
class ExpertShard:
    """One rank's experts [start, end) of `num_experts`; `local` maps a global expert id to
    its index among this rank's experts, or to end - start for another rank's expert."""

    start: int
    end: int
    num_experts: int
    local: torch.Tensor
    tp: TPGroup

    def local_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return self.local[ids]


def check_expert_split(num_experts: int, world_size: int) -> None:
    if world_size > num_experts:
        raise TensorParallelError(
            f"tensor_parallel_size {world_size} exceeds the {num_experts} experts per layer: "
            "expert parallelism needs at least one expert per rank"
        )


def shard_experts(block: SparseMoeBlock, tp: TPGroup) -> ExpertShard:
    """Cuts `block`'s experts (loaded, not yet packed) down to rank `tp.rank`'s share; the
    router and any shared expert stay whole. Dense experts get new [E_local, ...] stacks of
    their own (the whole stacks are freed); quantized experts are dropped whole (the kept ones'
    blocks are copied when they are packed)."""
    experts = block.experts
    num = len(experts)
    check_expert_split(num, tp.world_size)
    e0, e1 = even_split(num, tp.world_size)[tp.rank]
    keep = [experts[e] for e in range(e0, e1)]
    if experts.gate_up_proj is not None and experts.down_proj is not None:
        gate_up = torch.stack([ex.gate_up_proj.weight.data for ex in keep])
        down = torch.stack([ex.down_proj.weight.data for ex in keep])
        experts.gate_up_proj, experts.down_proj = gate_up, down
        for i, ex in enumerate(keep):  # each expert's weight a view of its row again
            ex.gate_up_proj.weight = nn.Parameter(gate_up[i], requires_grad=False)
            ex.down_proj.weight = nn.Parameter(down[i], requires_grad=False)
    del experts[e1:]
    del experts[:e0]
    device = block.gate.weight.device
    local = torch.full((num,), e1 - e0, dtype=torch.int64, device=device)
    local[e0:e1] = torch.arange(e1 - e0, device=device)
    shard = ExpertShard(e0, e1, num, local, tp)
    block.expert_parallel = shard
    return shard
