"""Block-quantized weights in the layout of the Triton matmul (`kernels.triton_quant`): the
layout is described there. Pure torch: no triton needed to pack, unpack or dequantize."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill.quant.packing import BLOCK, BlockWeights


@dataclass
class GpuQuantWeight:
    """A quantized [N, K] weight in the kernel's layout (see the module docstring)."""

    qweight: torch.Tensor  # uint8 [N, K // 2] (bits 4) or [N, K] (bits 8)
    d: torch.Tensor  # fp16 [K // 32, N]
    m: torch.Tensor  # fp16 [K // 32, N]
    bits: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.d.shape[1], self.d.shape[0] * BLOCK

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def nbytes(self) -> int:
        return self.qweight.numel() + (self.d.numel() + self.m.numel()) * 2

    def to(self, device: torch.device | str) -> GpuQuantWeight:
        return GpuQuantWeight(
            self.qweight.to(device), self.d.to(device), self.m.to(device), self.bits
        )


def pack_for_gpu(bw: BlockWeights) -> GpuQuantWeight:
    """`bw` in the kernel's layout, on bw's device. Lossless (`unpack_gpu` inverts it)."""
    n, k = bw.shape
    if bw.bits == 4:  # q < 16: the shift cannot overflow a byte
        qweight = (bw.q[..., :16] | (bw.q[..., 16:] << 4)).reshape(n, k // 2)
    elif bw.bits == 8:
        qweight = bw.q.reshape(n, k)
    else:
        raise ValueError(f"{bw.bits}-bit weights: the GPU kernel takes 4 or 8 bits")
    return GpuQuantWeight(
        qweight.contiguous(), bw.d.t().contiguous(), bw.m.t().contiguous(), bw.bits
    )


def unpack_gpu(w: GpuQuantWeight) -> BlockWeights:
    """The `BlockWeights` that `pack_for_gpu` packed (pure torch, any device)."""
    n, k = w.shape
    if w.bits == 4:
        p = w.qweight.reshape(n, k // BLOCK, BLOCK // 2)
        q = torch.cat((p & 0x0F, p >> 4), dim=-1)  # [N, nb, 32]
    else:
        q = w.qweight.reshape(n, k // BLOCK, BLOCK)
    return BlockWeights(q.contiguous(), w.d.t().contiguous(), w.m.t().contiguous(), w.bits)


def dequantize_gpu(w: GpuQuantWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense weight [N, K] (pure torch, any device): the oracle and the fallback. In float32
    it is bit-exact with `BlockWeights.dequantize()` (the same two separate float32 ops)."""
    return unpack_gpu(w).dequantize().to(dtype)
