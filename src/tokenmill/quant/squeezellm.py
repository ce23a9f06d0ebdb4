"""SqueezeLLM weights (per-row lookup table + sparse outliers) and their Linear method.

A weight [R, C] is stored as
- `codes`: uint8 [R, ceil(C / 2)], two 4-bit indices per byte (element 2j in the low nibble,
  2j + 1 in the high one; each row starts on a byte). 3-bit codes use the same 4-bit slots:
  3-bit checkpoints take 4 bits per weight in memory, not 3 (`nbytes` counts what is stored);
- `lut`: fp16 [R, 2^bits], the row's centroids;
- a CSR matrix (`crow` int32 [R + 1], `col` int32 [nnz], `val` float32 [nnz]) added on top.
w[r, k] = lut[r, code[r, k]] + sparse[r, k]. The C++ kernel (csrc/squeezellm.cpp) computes
y = x W^T from that directly; without it the weight is dequantized once at load (dense method).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from tokenmill.kernels.cpu_lut import kernel_lut, load_cpu_lut, lut_dequantize, lut_linear
from tokenmill.quant.block import kernel_or_dense
from tokenmill.quant.unquantized import UnquantizedMethod

if TYPE_CHECKING:
    from tokenmill.layers.linear import Linear

logger = logging.getLogger(__name__)

# Above this many rows of bf16 activations (prefill, large batches) the weight is dequantized to
# bf16 for the call and multiplied densely: the lookup kernel's float32 FMAs cost more per row
# than dequantizing plus oneDNN's bf16 matmul once each weight is reused this often (measured on
# the 2-core host, 3072 x 576 layer: 4 rows 0.26 vs 0.79 ms, 16 rows 0.94 vs 0.76 ms, 128 rows
# 8.3 vs 1.3 ms). Never in batch-invariant mode, where a row must not depend on the batch size.
DENSE_ABOVE_ROWS = 12
# checkpoint tensor suffixes of one quantized linear weight (`<prefix>.sq_<part>`)
PARTS = ("codes", "lut", "crow", "col", "val", "shape")


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """int codes [R, C] (< 16) -> uint8 [R, ceil(C / 2)], element 2j low nibble."""
    c = codes.to(torch.uint8)
    if c.shape[1] % 2:
        c = torch.cat([c, c.new_zeros(c.shape[0], 1)], dim=1)
    return (c[:, 0::2] | (c[:, 1::2] << 4)).contiguous()


def unpack_codes(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of pack_codes: int64 [R, cols]."""
    c = torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(packed.shape[0], -1)
    return c[:, :cols].long()


@dataclass
class SqueezeLLMWeights:
    codes: torch.Tensor
    lut: torch.Tensor
    crow: torch.Tensor
    col: torch.Tensor
    val: torch.Tensor
    bits: int
    cols: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape[0], self.cols

    def sparse_rows(self) -> torch.Tensor:
        """The row of every sparse entry (expanded from crow)."""
        counts = (self.crow[1:] - self.crow[:-1]).long()
        return torch.repeat_interleave(torch.arange(len(counts)), counts)

    def dequantize(self) -> torch.Tensor:
        """The float32 weight [R, C] (the reference the kernel is tested against)."""
        w = self.lut.float().gather(1, unpack_codes(self.codes, self.cols))
        return w.index_put_(
            (self.sparse_rows(), self.col.long()), self.val.float(), accumulate=True
        )

    def nbytes(self) -> int:
        """Bytes the matmul reads: codes, LUT, CSR (not the shape record)."""
        parts = (self.codes, self.lut, self.crow, self.col, self.val)
        return sum(t.numel() * t.element_size() for t in parts)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The checkpoint tensors (names: PARTS)."""
        shape = torch.tensor(self.shape, dtype=torch.int64)
        return dict(codes=self.codes, lut=self.lut, crow=self.crow, col=self.col, val=self.val,
                    shape=shape)  # fmt: skip

    @classmethod
    def from_tensors(cls, parts: dict[str, torch.Tensor], bits: int) -> SqueezeLLMWeights:
        rows, cols = (int(v) for v in parts["shape"])
        if parts["codes"].shape != (rows, (cols + 1) // 2) or parts["lut"].shape != (
            rows,
            1 << bits,
        ):
            raise ValueError(f"SqueezeLLM tensors do not match shape {(rows, cols)}, {bits} bits")
        return cls(
            parts["codes"].to(torch.uint8).contiguous(),
            parts["lut"].to(torch.float16).contiguous(),
            parts["crow"].to(torch.int32).contiguous(),
            parts["col"].to(torch.int32).contiguous(),
            parts["val"].to(torch.float32).contiguous(),
            bits,
            cols,
        )


def cat_rows(parts: list[SqueezeLLMWeights]) -> SqueezeLLMWeights:
    """Stacks the row blocks of a fused layer (q/k/v, gate/up) into one weight."""
    if len({(p.bits, p.cols) for p in parts}) != 1:
        raise ValueError("fused SqueezeLLM parts differ in bits or columns")
    crows, offset = [parts[0].crow[:1]], 0
    for p in parts:
        crows.append(p.crow[1:] + offset)
        offset += int(p.crow[-1])
    return SqueezeLLMWeights(
        torch.cat([p.codes for p in parts]),
        torch.cat([p.lut for p in parts]),
        torch.cat(crows),
        torch.cat([p.col for p in parts]),
        torch.cat([p.val for p in parts]),
        parts[0].bits,
        parts[0].cols,
    )


class SqueezeLLMMethod:
    def __init__(self) -> None:
        self.parts: dict[str | None, SqueezeLLMWeights] = {}
        self.bits = 0
        self.tensors: tuple[torch.Tensor, ...] = ()  # codes, lut [R, 16], crow, col, val

    def create_weights(self, layer: Linear) -> None:
        # A dense placeholder: dense tensors load into it (a fused layer may mix quantized and
        # dense shards), and it stays if no kernel takes the quantized ones.
        UnquantizedMethod().create_weights(layer)

    def load(self, layer: Linear, weights: SqueezeLLMWeights, shard: str | None) -> None:
        if not isinstance(weights, SqueezeLLMWeights):
            raise ValueError(f"{layer}: a {type(weights).__name__} arrived for a SqueezeLLM layer")
        self.parts[shard] = weights

    def process_after_loading(self, layer: Linear) -> None:
        order = getattr(layer, "shard_names", (None,))
        if not self.parts:  # a layer the checkpoint keeps dense (the LM head, say)
            layer.quant_method = UnquantizedMethod()
            layer.quant_method.process_after_loading(layer)
            return
        if any(s not in self.parts for s in order):
            raise ValueError(f"{layer}: a fused layer mixes SqueezeLLM and dense shards")
        sq = cat_rows([self.parts[s] for s in order])
        self.parts.clear()
        self.bits = sq.bits
        if layer.weight.device.type == "cpu" and load_cpu_lut() is not None:
            self.tensors = (sq.codes, kernel_lut(sq.lut), sq.crow, sq.col, sq.val)
            layer.weight_bytes = sq.nbytes()
            if "weight" in layer._parameters:
                del layer._parameters["weight"]
            return
        logger.warning("SqueezeLLM kernel unavailable: dequantizing %s", layer)
        layer.weight.data.copy_(sq.dequantize().to(layer.weight.device, layer.weight.dtype))
        layer.quant_method = UnquantizedMethod()
        layer.quant_method.process_after_loading(layer)

    def describe(self, layer: Linear) -> str:
        return f"squeezellm{self.bits}"

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        tensors, cols = self.tensors, layer.in_features
        return kernel_or_dense(
            layer,
            x,
            DENSE_ABOVE_ROWS,
            lambda x: lut_linear(x, *tensors),
            lambda: lut_dequantize(*tensors, cols),
        )
