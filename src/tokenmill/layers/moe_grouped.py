"""The grouped quantized path of a MoE layer (layers/moe.py's Experts): every active expert's
gate_up in one call of the CPU kernel's grouped_quant_linear, the activation, every active
expert's down in a second call, then the weighted rows added per token in ascending expert
order. It computes what the loop over experts computes (each expert's Linear, then index_add_),
bit for bit: the kernel sends each expert's rows through the very tile passes quant_linear
would, and the combine rounds after each expert's add as index_add_ does. It replaces, per
layer, a Python round trip, two kernel calls (each waking the thread pool) and half a dozen
small tensor ops per active expert.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from tokenmill.kernels.cpu_fused import fused_ops
from tokenmill.kernels.cpu_quant import load_cpu_quant
from tokenmill.quant.block import dense_above_rows

if TYPE_CHECKING:
    from tokenmill.layers.linear import Linear
    from tokenmill.layers.moe import Experts


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of gate_up [T, 2 I] (gate columns, then up), per row."""
    ops = fused_ops(gate_up)
    if ops is not None:
        return ops.silu_mul.default(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def _packed(layer: Linear) -> tuple[torch.Tensor, int] | None:
    """The CPU kernel's packed weight of a quantized layer without bias, and its bits."""
    packed = getattr(layer.quant_method, "packed", None)
    if packed is None or layer.bias is not None:
        return None
    return packed, layer.quant_method.bits


def combine(
    out: torch.Tensor, contrib: torch.Tensor, order: torch.Tensor, top_k: int
) -> torch.Tensor:
    """out [T, hidden] += each token's k rows of `contrib` (rows in `order`'s sorted
    positions), one add per slot in ascending expert order, rounding after each as the
    loop's index_add_ per expert does. (One index_add_ over all rows is not the same: in
    bfloat16 it accumulates a token's rows in float32 and rounds once.)"""
    inv = torch.empty_like(order)
    inv[order] = torch.arange(order.numel())
    # A token's sorted positions, ascending: its experts in ascending order.
    pos = inv.view(-1, top_k).sort(dim=1).values  # [T, k]
    per_token = contrib[pos]  # [T, k, hidden]
    for s in range(top_k):
        out += per_token[:, s]
    return out


def grouped_experts(experts: Experts, rows: torch.Tensor, counts: list[int]) -> torch.Tensor | None:
    """Every active expert on its rows (`rows` grouped by expert, counts[e] rows for expert
    e) in two grouped calls of the quantized CPU kernel, gate_up then down, with the
    activation between: what the loop over experts computes, bit for bit, without a Python
    round trip per expert. None where it does not apply (dense or GPU experts, mixed bit
    widths, no kernel, or an expert with more rows than the kernel takes on its own)."""
    if rows.device.type != "cpu" or rows.dtype not in (torch.float32, torch.bfloat16):
        return None
    ops = load_cpu_quant()
    active = [e for e, n in enumerate(counts) if n]
    if ops is None or not active:
        return None
    first = experts[active[0]]
    # Above dense_above_rows() bfloat16 rows a quantized layer multiplies densely (see
    # kernel_or_dense): the loop takes those batches, so the two paths agree.
    limit = dense_above_rows()
    dense_above = rows.dtype == torch.bfloat16 and not first.down_proj.batch_invariant
    if dense_above and limit is not None and max(counts) > limit:
        return None
    gate_up, down = [], []
    for e in active:
        a, b = _packed(experts[e].gate_up_proj), _packed(experts[e].down_proj)
        if a is None or b is None:
            if not hasattr(experts[e].gate_up_proj.quant_method, "packed"):
                experts.grouped = False  # not block-quantized: no need to ask again
            return None
        gate_up.append(a)
        down.append(b)
    bits_gu, bits_down = {b for _, b in gate_up}, {b for _, b in down}
    if len(bits_gu) != 1 or len(bits_down) != 1 or first.down_proj.dtype != rows.dtype:
        return None
    n = [counts[e] for e in active]
    h = ops.grouped_quant_linear.default(
        rows, [w for w, _ in gate_up], n, first.gate_up_proj.out_features, bits_gu.pop()
    )
    h = silu_mul(h).contiguous()
    return ops.grouped_quant_linear.default(
        h, [w for w, _ in down], n, first.down_proj.out_features, bits_down.pop()
    )
