"""The CUDA path of a MoE layer (layers/moe.py's Experts): every active expert's gate_up in one
launch of the Triton fused-MoE kernel (kernels/triton_moe.py), the activation, every active
expert's down in a second launch; the MoE layer then adds the weighted rows per token in
ascending expert order as the loop does. It replaces a launch (and a host round trip) per
active expert and projection.

The kernel reads each projection stacked over the experts: dense experts already are (the
layer's `gate_up_proj` / `down_proj` buffers, of which each expert's weight is a view);
quantized experts in the Triton layout are stacked once, at their first forward, and each
expert's own weight then becomes a view of the stack (no second copy stays). Experts the
kernel cannot take (other quant methods, mixed bit widths, offloaded experts) keep the loop.
"""

from __future__ import annotations

import importlib.util
import os
from typing import TYPE_CHECKING

import torch

from tokenmill.layers.moe_grouped import silu_mul
from tokenmill.quant.unquantized import UnquantizedMethod

if TYPE_CHECKING:
    from tokenmill.kernels.triton_moe import MoeWeights
    from tokenmill.layers.linear import Linear
    from tokenmill.layers.moe import Experts


def _use_triton_moe(device: torch.device) -> bool:
    """Whether experts on `device` run the fused kernel (tests monkeypatch this to run it
    under Triton's interpreter on CPU)."""
    if device.type != "cuda" or os.environ.get("TOKENMILL_NO_TRITON"):
        return False
    return importlib.util.find_spec("triton") is not None


def _stack_quantized(layers: list[Linear]) -> MoeWeights | None:
    from tokenmill.kernels.triton_moe import MoeWeights
    from tokenmill.quant.gpu_layout import GpuQuantWeight

    weights = [getattr(lin.quant_method, "gpu_weight", None) for lin in layers]
    if any(w is None for w in weights) or len({w.bits for w in weights}) != 1:
        return None
    stacked = MoeWeights(
        torch.stack([w.qweight for w in weights]),
        torch.stack([w.d for w in weights]),
        torch.stack([w.m for w in weights]),
        weights[0].bits,
    )
    for e, lin in enumerate(layers):  # the per-expert path reads views of the stack
        lin.quant_method.gpu_weight = GpuQuantWeight(
            stacked.w[e], stacked.d[e], stacked.m[e], stacked.bits
        )
    return stacked


def _stacks(experts: Experts) -> tuple[MoeWeights, MoeWeights] | None:
    from tokenmill.kernels.triton_moe import MoeWeights

    gate_up = [e.gate_up_proj for e in experts]
    down = [e.down_proj for e in experts]
    if any(lin.bias is not None for lin in gate_up + down):
        return None
    if all(isinstance(lin.quant_method, UnquantizedMethod) for lin in gate_up + down):
        stacks = (experts.gate_up_proj, experts.down_proj)
        if stacks[0] is None or stacks[1] is None:
            return None
        # Each expert's weight must still be the view of its row that Experts made.
        views = all(
            lin.weight.data_ptr() == stack[e].data_ptr()
            for stack, layers in zip(stacks, (gate_up, down), strict=True)
            for e, lin in enumerate(layers)
        )
        return (MoeWeights(stacks[0]), MoeWeights(stacks[1])) if views else None
    a, b = _stack_quantized(gate_up), _stack_quantized(down)
    return None if a is None or b is None else (a, b)


def triton_experts(experts: Experts, rows: torch.Tensor, counts: list[int]) -> torch.Tensor | None:
    """Every active expert on its rows (`rows` grouped by expert, counts[e] for expert e) in
    two launches of the fused kernel; None where it does not apply."""
    if not _use_triton_moe(rows.device):
        return None
    stacks = experts.triton_stacks
    if stacks is None:
        stacks = _stacks(experts)
        if stacks is None:
            experts.use_triton = False  # not stackable: no need to ask again
            return None
        experts.triton_stacks = stacks
    from tokenmill.kernels.triton_moe import moe_matmul

    gate_up, down = stacks
    dtype = experts[0].down_proj.dtype
    x = rows.to(dtype)
    h = silu_mul(moe_matmul(x, gate_up, counts))
    return moe_matmul(h.contiguous(), down, counts)
