"""Linear layers: the shapes here, the weight and its matmul in a `QuantMethod` (quant.base)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tokenmill.quant.base import QuantMethod, QuantScheme, make_quant_method


class Linear(nn.Module):
    """y = x W^T (+ b). `weight` is [out_features, in_features], as in HF checkpoints."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
        quant: QuantScheme = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.dtype = dtype
        self.batch_invariant = False
        self.packed_weight: torch.Tensor | None = None
        self._weight_bytes: int | None = None
        self.quant_method: QuantMethod = make_quant_method(quant)
        self.quant_method.create_weights(self)
        self.bias = (
            nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False)
            if bias
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x)

    def load_quantized(self, tensor: Any, shard: str | None = None) -> None:
        """Takes a weight (or one shard of a fused weight) that stays quantized."""
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
        quant: QuantScheme = None,
    ) -> None:
        super().__init__(in_features, sum(shard_sizes), bias=bias, dtype=dtype, quant=quant)
        self.shard_sizes = list(shard_sizes)
        self.shard_names = shard_names

    def shard_offset(self, name: str) -> tuple[int, int]:
        i = self.shard_names.index(name)
        start = sum(self.shard_sizes[:i])
        return start, start + self.shard_sizes[i]
