"""2-bit round-to-nearest blocks: four weights a byte, and a Linear method that dequantizes them
for each call and multiplies densely (no 2-bit matmul kernel exists here, on the CPU or in
Triton: a dequantize-then-matmul fallback, correct but not fast).

The values are `packing.quantize_rtn(w, 2, group)`'s (q in 0..3, one fp16 scale d and offset m
per row and block of 32, w = d * q + m in float32); only the storage of q differs: byte j of a
row's block holds its weights j, j + 8, j + 16 and j + 24 in bits 0-1, 2-3, 4-5 and 6-7.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from tokenmill.quant.packing import BLOCK, BlockWeights

if TYPE_CHECKING:
    from tokenmill.layers.linear import Linear

QUARTER = BLOCK // 4  # bytes per block of 32 two-bit values


def pack_int2(bw: BlockWeights) -> torch.Tensor:
    """q of 2-bit BlockWeights [rows, nb, 32] -> uint8 [rows, nb, 8]."""
    if bw.bits != 2:
        raise ValueError(f"pack_int2 takes 2-bit weights, got {bw.bits} bits")
    q = bw.q.reshape(*bw.q.shape[:2], 4, QUARTER)  # [rows, nb, 4 quarters, 8]
    return (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).contiguous()


def unpack_int2(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int2: uint8 [rows, nb, 8] -> q uint8 [rows, nb, 32]."""
    return torch.cat([(packed >> s) & 0x3 for s in (0, 2, 4, 6)], dim=-1)


class Int2Method:
    """A Linear's weight as packed 2-bit blocks; y = x @ dequantize(W)^T in x's dtype."""

    def __init__(self, bw: BlockWeights) -> None:
        self.qweight = pack_int2(bw)
        self.d = bw.d.contiguous()
        self.m = bw.m.contiguous()
        self.bits = 2

    def create_weights(self, layer: Linear) -> None:
        pass

    def load(self, layer: Linear, tensor: Any, shard: str | None) -> None:
        raise ValueError(f"{layer}: 2-bit weights are built from another layer, not loaded")

    def process_after_loading(self, layer: Linear) -> None:
        pass

    def describe(self, layer: Linear) -> str:
        return "int2"

    def nbytes(self) -> int:
        return self.qweight.numel() + (self.d.numel() + self.m.numel()) * 2

    def dequantize(self) -> torch.Tensor:
        """The dense float32 weight [rows, cols] (BlockWeights.dequantize's two float32 ops)."""
        bw = BlockWeights(unpack_int2(self.qweight), self.d, self.m, 2)
        return bw.dequantize()

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize().to(x.dtype), layer.bias).to(layer.dtype)
