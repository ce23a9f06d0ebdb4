"""Linear layers. The matmul is delegated to a quantization method so formats plug in later."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.layers.quantization.block_method import BlockQuantMethod
from tokenmill.layers.quantization.packing import BlockWeights, QuantizedTensor
from tokenmill.layers.quantization.squeezellm import SqueezeLLMMethod, SqueezeLLMWeights

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


class UnquantizedMethod:
    """Dense weights in the compute dtype; on CPUs, bf16/fp16 weights are pre-packed for oneDNN."""

    def create_weights(self, layer: Linear) -> None:
        layer.weight = nn.Parameter(
            torch.empty(layer.out_features, layer.in_features, dtype=layer.dtype),
            requires_grad=False,
        )

    def process_after_loading(self, layer: Linear) -> None:
        layer.packed_weight = None
        if _can_prepack(layer.weight):
            try:
                packed = torch.ops.mkldnn._reorder_linear_weight(layer.weight, _PACK_HINT_ROWS)
            except RuntimeError:  # a build without this oneDNN path: plain F.linear
                return
            layer.packed_weight = packed

    def describe(self, layer: Linear) -> str:
        w = layer._parameters.get("weight")
        return "dense" if w is None else str(w.dtype).removeprefix("torch.")

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        if not layer.batch_invariant:
            return self._matmul(layer, x)
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


class Linear(nn.Module):
    """y = x W^T (+ b). `weight` is [out_features, in_features], as in HF checkpoints."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
        quant_method: UnquantizedMethod | BlockQuantMethod | SqueezeLLMMethod | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.dtype = dtype
        self.batch_invariant = False
        self.packed_weight: torch.Tensor | None = None
        self._weight_bytes: int | None = None
        self.quant_method = quant_method or UnquantizedMethod()
        self.quant_method.create_weights(self)
        self.bias = (
            nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False)
            if bias
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x)

    def load_quantized(
        self,
        tensor: QuantizedTensor | BlockWeights | SqueezeLLMWeights,
        shard: str | None = None,
    ) -> None:
        """Takes a weight (or one shard of a fused weight) that stays quantized."""
        if isinstance(tensor, SqueezeLLMWeights):
            if not isinstance(self.quant_method, SqueezeLLMMethod):
                self.quant_method = SqueezeLLMMethod()
            self.quant_method.load(self, tensor, shard)
            return
        if not isinstance(self.quant_method, BlockQuantMethod):
            self.quant_method = BlockQuantMethod()
        self.quant_method.load(self, tensor, shard)

    @property
    def weight_bytes(self) -> int:
        """Bytes of weight the matmul reads (the packed blocks when quantized)."""
        if self._weight_bytes is not None:
            return self._weight_bytes
        w = self._parameters.get("weight")
        return 0 if w is None else w.numel() * w.element_size()

    @weight_bytes.setter
    def weight_bytes(self, value: int) -> None:
        self._weight_bytes = value

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}"


class MergedLinear(Linear):
    """Several projections of the same input fused into one matmul (q/k/v, gate/up).

    `shard_sizes` gives each part's output rows in order; `shard_names` the HF names that load
    into them, e.g. ("q_proj", "k_proj", "v_proj").
    """

    def __init__(
        self,
        in_features: int,
        shard_sizes: list[int],
        shard_names: tuple[str, ...],
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(in_features, sum(shard_sizes), bias=bias, dtype=dtype)
        self.shard_sizes = list(shard_sizes)
        self.shard_names = shard_names

    def shard_offset(self, name: str) -> tuple[int, int]:
        i = self.shard_names.index(name)
        start = sum(self.shard_sizes[:i])
        return start, start + self.shard_sizes[i]
