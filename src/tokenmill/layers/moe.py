"""Mixture-of-experts feed-forward: a router scores the experts of each token, the top k of them
run on it (SwiGLU each), and their outputs are summed with the routing weights.

x [T, hidden] -> router logits [T, E] -> softmax (fp32) -> top-k -> (renormalise) -> weights,
ids [T, k] -> each token's k experts -> weighted sum [T, hidden] (+ a shared expert, gated).

The fused path groups the (token, expert) pairs by expert with one stable sort, runs each active
expert once on its rows and adds the weighted rows back with index_add_. A token's result is
independent of the other tokens of the batch when the linear layers are batch-invariant: its
rows go through the same per-row matmuls, and its k contributions are added in ascending
expert order (the sort is stable and an expert appears at most once among a token's top k).
Experts in quantized blocks on the CPU take the grouped kernel instead (layers/moe_grouped.py:
all active experts in one call per projection), which gives the loop's bits; experts on CUDA
(dense, or in the Triton kernel's blocks) the fused Triton kernel (layers/moe_triton.py, one
launch per projection); the loop stays as their oracle and for everything else (offloaded
experts, large bfloat16 batches on the CPU, other quant methods).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.layers.expert_cache import ExpertCache
from tokenmill.layers.expert_source import building_mapped, map_experts
from tokenmill.layers.linear import Linear, MergedLinear
from tokenmill.layers.moe_grouped import combine, grouped_experts, silu_mul
from tokenmill.layers.moe_triton import triton_experts
from tokenmill.quant.base import QuantScheme

if TYPE_CHECKING:
    from tokenmill.layers.expert_parallel import ExpertShard


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); gate and up fused as one matmul (rows gate, then up)."""

    def __init__(
        self, hidden_size: int, intermediate_size: int, dtype: torch.dtype, quant: QuantScheme
    ) -> None:
        super().__init__()
        inter = intermediate_size
        self.gate_up_proj = MergedLinear(
            hidden_size, [inter, inter], ("gate_proj", "up_proj"), dtype=dtype, quant=quant
        )
        self.down_proj = Linear(inter, hidden_size, dtype=dtype, quant=quant)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_mul(self.gate_up_proj(x)))


def route(
    router_logits: torch.Tensor, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' top-k router: softmax over all experts in float32, then the top k, then
    (Mixtral always, Qwen-MoE / OLMoE with norm_topk_prob) divided by their sum.
    Returns (weights float32 [T, k], expert ids int64 [T, k])."""
    probs = torch.softmax(router_logits.float(), dim=-1)  # [T, E]
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


class Experts(nn.ModuleList):
    """E SwiGLU experts of one layer; expert e is the module `self[e]`, whose linear layers
    the loader fills by their per-expert names (`experts.{e}.gate_proj.weight`, ...) and the
    runner prepares as any linear layer.

    Dense weights (`quant` None) are stacked per projection: `gate_up_proj` [E, 2 I, hidden]
    (each expert's gate rows, then its up rows) and `down_proj` [E, hidden, I], as transformers
    stacks them, and each expert's weight is a view of its row. Quantized ones stay per expert,
    in each expert's quant method (its blocks, packed for the kernel): no dense stack is
    allocated beside them, only each expert's placeholder for a part that arrives dense.
    """

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        dtype: torch.dtype,
        quant: QuantScheme,
    ) -> None:
        super().__init__()
        self.quant = quant
        inter = intermediate_size
        gate_up = down = None
        mapped = building_mapped()  # offloaded: placeholders on meta, dropped by map_experts
        with torch.device("meta") if mapped else contextlib.nullcontext():
            if quant is None:
                gate_up = torch.empty(num_experts, 2 * inter, hidden_size, dtype=dtype)
                down = torch.empty(num_experts, hidden_size, inter, dtype=dtype)
            # Buffers, not parameters: the per-expert views are the parameters the loader fills.
            self.register_buffer("gate_up_proj", gate_up, persistent=False)
            self.register_buffer("down_proj", down, persistent=False)
            for e in range(num_experts):
                expert = SwiGLU(hidden_size, inter, dtype, quant)
                if self.gate_up_proj is not None and self.down_proj is not None:
                    view = nn.Parameter(self.gate_up_proj[e], requires_grad=False)
                    expert.gate_up_proj.weight = view
                    expert.down_proj.weight = nn.Parameter(self.down_proj[e], requires_grad=False)
                self.append(expert)
        if mapped:
            map_experts(self)
        # Set by `offload_experts`: the slot cache that holds this layer's experts when they
        # are offloaded, and this layer's index among the model's MoE layers.
        self.cache: ExpertCache | None = None
        self.layer_id = 0
        # Whether to try the grouped quantized kernel (cleared once the experts turn out not to
        # be packed for it; benchmarks clear it to time the loop).
        self.grouped = True
        # The fused Triton kernel on CUDA (layers/moe_triton.py): cleared once the experts turn
        # out not to be stackable; the stacked weights, built at the first forward.
        self.use_triton = True
        self.triton_stacks: tuple | None = None

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [T, hidden], weights [T, k] (float32, or x's dtype), ids [T, k] -> [T, hidden]."""
        cache = self.cache
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            if cache is not None:
                raise RuntimeError("offloaded experts cannot run inside a CUDA graph")
            return self.every_expert(x, weights, ids)  # no host sync inside a CUDA graph
        top_k = ids.shape[1]
        flat = ids.flatten()  # [T k]: pair j is token j // k
        # Stable: within an expert, pairs keep their token order. Under expert parallelism
        # the pairs of other ranks' experts carry the id len(self) (`expert_parallel`): they
        # sort last and are dropped here.
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=len(self) + 1).tolist()
        others = counts.pop(len(self))
        pairs = order[: order.numel() - others]
        tokens = pairs // top_k  # grouped by expert
        pair_weights = weights.flatten()[pairs].unsqueeze(-1)  # [pairs, 1]
        rows = x[tokens]  # [pairs, hidden]
        out = torch.zeros_like(x)
        if others and pairs.numel() == 0:  # no token for this rank's experts this step
            return out
        y = None
        if cache is None and self.use_triton:
            y = triton_experts(self, rows, counts)
        if y is None and cache is None and self.grouped:
            y = grouped_experts(self, rows, counts)
        if y is not None:
            contrib = (y * pair_weights).to(out.dtype)
            if others:  # zero rows for the other ranks' pairs: adding them changes no bit
                contrib = torch.cat([contrib, contrib.new_zeros(others, contrib.shape[1])])
            return combine(out, contrib, order, top_k)
        top = [1.0] * len(self)  # each expert's largest routing weight, for mixed precision
        if cache is not None:
            cache.begin_layer(self.layer_id, [e for e, n in enumerate(counts) if n], x.shape[0])
            if cache.low_precision is not None:
                w = weights.detach().flatten().float()
                top = torch.zeros(len(self), device=w.device).scatter_reduce_(0, flat, w, "amax")
                top = top.tolist()
        start = 0
        for e, n in enumerate(counts):  # the active experts only
            if n == 0:
                continue
            end = start + n
            # An offloaded expert runs from its slot: the same bytes, so the same result.
            expert = self[e] if cache is None else cache.get(self.layer_id, e, top[e])
            y = expert(rows[start:end]) * pair_weights[start:end]  # [n, hidden]
            out.index_add_(0, tokens[start:end], y.to(out.dtype))
            start = end
        return out

    def every_expert(
        self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
    ) -> torch.Tensor:
        """The same sum with no data-dependent shapes, for CUDA graph capture: every expert on
        every row, scaled by the token's weight for it (0 where not chosen), added in ascending
        expert order as the grouped path adds the chosen ones (the zeros change no sum)."""
        out = torch.zeros_like(x)
        for e in range(len(self)):
            w = (weights * (ids == e)).sum(dim=-1, keepdim=True)  # [T, 1]
            out += (self[e](x) * w).to(out.dtype)
        return out

    def reference(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The oracle: every expert on every token from the dense stacks (einsum), combined by
        the dense [T, E] matrix of routing weights (zero where an expert is not chosen)."""
        if self.gate_up_proj is None or self.down_proj is None:
            raise ValueError("the dense reference needs dense experts (built with quant None)")
        gate_up = torch.einsum("th,eoh->eto", x, self.gate_up_proj)  # [E, T, 2 I]
        gate, up = gate_up.chunk(2, dim=-1)
        y = torch.einsum("eti,ehi->eth", F.silu(gate) * up, self.down_proj)  # [E, T, hidden]
        # One more column for the id of other ranks' experts (`expert_parallel`), dropped.
        dense = torch.zeros(x.shape[0], len(self) + 1, dtype=weights.dtype, device=x.device)
        dense.scatter_(1, ids, weights)
        dense = dense[:, : len(self)]  # [T, E]
        return torch.einsum("te,eth->th", dense.to(y.dtype), y)


class SparseMoeBlock(nn.Module):
    """The router (`gate`, [E, hidden]), the experts and, for Qwen2-MoE, a shared expert that
    every token runs, scaled by sigmoid(shared_expert_gate(x)).

    `weights_in_act_dtype`: Qwen-MoE and OLMoE round the routing weights to the activations'
    dtype before scaling; Mixtral scales in float32 and rounds the product.
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        intermediate_size: int,
        renormalize: bool,
        dtype: torch.dtype,
        quant: QuantScheme,
        *,
        shared_intermediate_size: int | None = None,
        weights_in_act_dtype: bool = True,
    ) -> None:
        super().__init__()
        self.top_k = top_k
        self.renormalize = renormalize
        self.weights_in_act_dtype = weights_in_act_dtype
        self.gate = Linear(hidden_size, num_experts, dtype=dtype, quant=quant)
        self.experts = Experts(num_experts, hidden_size, intermediate_size, dtype, quant)
        self.shared_expert: SwiGLU | None = None
        self.shared_expert_gate: Linear | None = None
        if shared_intermediate_size:
            self.shared_expert = SwiGLU(hidden_size, shared_intermediate_size, dtype, quant)
            self.shared_expert_gate = Linear(hidden_size, 1, dtype=dtype, quant=quant)
        # Layer-level prefetch (set by `offload_experts`): the next MoE layer, whose router
        # this layer runs on its own input to predict the next layer's experts.
        self.prefetch_next: SparseMoeBlock | None = None
        # Expert parallelism (layers/expert_parallel.py): this rank's share of the experts;
        # the partial outputs are summed over the ranks before the shared expert is added.
        self.expert_parallel: ExpertShard | None = None

    def routing(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights, ids = route(self.gate(x), self.top_k, self.renormalize)
        if self.weights_in_act_dtype:
            weights = weights.to(x.dtype)
        return weights, ids

    def forward(self, x: torch.Tensor, dense_reference: bool = False) -> torch.Tensor:
        weights, ids = self.routing(x)  # [T, k] each
        nxt = self.prefetch_next
        predicted = None
        if nxt is not None and not dense_reference:
            # The residual stream drifts little from one layer to the next, so the next router
            # on this layer's input mostly picks the experts it will pick on its own.
            predicted = route(nxt.gate(x), nxt.top_k, nxt.renormalize)[1]
        ep = self.expert_parallel
        if ep is not None:  # other ranks' experts -> len(self.experts), which Experts drops
            ids = ep.local_ids(ids)
        experts = self.experts.reference if dense_reference else self.experts
        out = experts(x, weights, ids)
        if ep is not None:
            out = ep.tp.all_reduce(out.contiguous())
        cache = self.experts.cache
        if predicted is not None and nxt is not None and cache is not None:
            # Loaded after this layer's experts ran: on a CPU the copy is synchronous, and done
            # before they ran it could evict one of them.
            cache.prefetch(nxt.experts.layer_id, predicted.unique().tolist())
        if self.shared_expert is not None and self.shared_expert_gate is not None:
            shared = self.shared_expert(x)  # [T, hidden]
            # The sigmoid over [T, hidden], not [T, 1]: a vectorized elementwise kernel takes
            # its scalar tail for the last elements of the tensor, whose bits differ, so on
            # [T, 1] a token's gate would depend on its position in the batch; rows of hidden
            # (a multiple of the vector width) all take the vector path.
            logit = self.shared_expert_gate(x).expand_as(shared).contiguous()
            out = out + torch.sigmoid(logit) * shared
        return out


def offload_experts(
    model: nn.Module,
    budget_bytes: int,
    policy: str = "lru",
    prefetch: bool = False,
    device: torch.device | str = "cpu",
    miss_bits: int | None = None,
    miss_threshold: float = 0.2,
) -> ExpertCache | None:
    """Puts the experts of every SparseMoeBlock of `model` behind one ExpertCache of
    `budget_bytes` (None for a model without experts); `prefetch` links each block to the next
    for layer-level prefetch (the last one to none: the next forward pass's first layer runs
    on other tokens); `miss_bits` / `miss_threshold`: mixed-precision misses (lossy)."""
    blocks = [m for m in model.modules() if isinstance(m, SparseMoeBlock)]
    if not blocks:
        return None
    cache = ExpertCache(
        [b.experts for b in blocks], budget_bytes, policy, device, miss_bits, miss_threshold
    )
    for i, block in enumerate(blocks):
        block.experts.cache = cache
        block.experts.layer_id = i
        nxt = blocks[i + 1] if prefetch and i + 1 < len(blocks) else None
        # Not a submodule (Module.__setattr__ would register it: the next block twice in the
        # module tree): a plain reference.
        object.__setattr__(block, "prefetch_next", nxt)
        if torch.device(device).type != "cpu":
            # The experts now live in host memory; the device stacks they were views of go.
            block.experts.gate_up_proj = None
            block.experts.down_proj = None
    return cache
