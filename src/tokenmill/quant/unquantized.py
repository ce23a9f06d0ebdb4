"""The dense method: weights in the compute dtype, multiplied by oneDNN / cuBLAS.

In batch-invariant mode a row must not depend on the rows beside it. On CPUs the
row-independent kernel (kernels.cpu_dense) serves float32 weights, and bfloat16 ones where
oneDNN has no AMX (there both run vdpbf16ps, and ours needs no padding at decode); with AMX,
oneDNN on fixed tiles of INVARIANT_TILE rows is faster from ~8 rows on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.kernels.cpu_dense import dense_linear, dense_supported, onednn_uses_amx, pack_dense

if TYPE_CHECKING:
    from tokenmill.layers.linear import Linear

# Rows per matmul tile in batch-invariant mode. oneDNN/MKL pick a kernel (and so a reduction
# order) from the row count; a fixed tile makes each row's result independent of its neighbours
# and of how many rows the step has (measured: bit-identical rows for any tiling, fp32 and bf16).
INVARIANT_TILE = 16


# Row count oneDNN optimizes a pre-packed weight layout for; measured on the 2-core EPYC: packed
# bf16 weights make the whole SmolLM2 step 1.3x faster at 1 row and 1.6x at 64 rows.
_PACK_HINT_ROWS = 64


def _can_prepack(weight: torch.Tensor) -> bool:
    return (
        weight.device.type == "cpu"
        and weight.dtype in (torch.bfloat16, torch.float16)
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


def invariant_kernel(dtype: torch.dtype) -> bool:
    """Whether batch-invariant mode multiplies weights of `dtype` with kernels.cpu_dense."""
    if dtype == torch.bfloat16 and onednn_uses_amx():
        return False
    return dtype in (torch.float32, torch.bfloat16) and dense_supported(dtype)


class UnquantizedMethod:
    """Dense weights in the compute dtype; on CPUs, bf16/fp16 weights are pre-packed for oneDNN."""

    def create_weights(self, layer: Linear) -> None:
        layer.weight = nn.Parameter(
            torch.empty(layer.out_features, layer.in_features, dtype=layer.dtype),
            requires_grad=False,
        )

    def process_after_loading(self, layer: Linear) -> None:
        layer.packed_weight = None
        self.invariant_weight: torch.Tensor | None = None  # packed on first invariant call
        if _can_prepack(layer.weight):
            try:
                packed = torch.ops.mkldnn._reorder_linear_weight(layer.weight, _PACK_HINT_ROWS)
            except RuntimeError:  # a build without this oneDNN path: plain F.linear
                return
            layer.packed_weight = packed

    def load(self, layer: Linear, tensor: Any, shard: str | None) -> None:
        raise ValueError(
            f"{layer}: a quantized {type(tensor).__name__} arrived for a layer built without "
            "quantization; build the model with the checkpoint's quantization scheme"
        )

    def describe(self, layer: Linear) -> str:
        w = layer._parameters.get("weight")
        return "dense" if w is None else str(w.dtype).removeprefix("torch.")

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        if not layer.batch_invariant:
            return self._matmul(layer, x)
        w = layer.weight
        if x.device.type == "cpu" and x.dtype == w.dtype and invariant_kernel(w.dtype):
            if getattr(self, "invariant_weight", None) is None:
                self.invariant_weight = pack_dense(w)
                layer.packed_weight = None  # oneDNN's copy: unused from now on
            return dense_linear(x, self.invariant_weight, layer.bias, layer.out_features)
        num_rows = x.shape[0]  # x: [num_rows, in]
        pad = -num_rows % INVARIANT_TILE
        if pad:
            x = torch.cat([x, x.new_zeros(pad, x.shape[1])])
        out = torch.cat([self._matmul(layer, tile) for tile in x.split(INVARIANT_TILE)])
        return out[:num_rows]

    @staticmethod
    def _matmul(layer: Linear, x: torch.Tensor) -> torch.Tensor:
        if layer.packed_weight is not None:
            return torch.ops.mkldnn._linear_pointwise(
                x, layer.packed_weight, layer.bias, "none", [], ""
            )
        return F.linear(x, layer.weight, layer.bias)
