"""The Linear method for weights kept in quantized blocks (GGUF Q4_0/Q4_1/Q8_0, int8, int4).

Loading hands each part of a layer's weight to `load` (a QuantizedTensor from a GGUF file or
BlockWeights quantized at load; a fused q/k/v or gate/up layer gets one part per shard). After
loading, `process_after_loading` concatenates the parts and packs them into the kernel's tiles.
On a CUDA device they are packed for the Triton kernel instead (`kernels.triton_quant`;
TOKENMILL_NO_TRITON or a missing triton keeps the dense path). Where no kernel is available, or
a fused layer mixes quantized and dense parts, the parts are dequantized into a dense weight and
the layer falls back to the dense method.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from tokenmill.kernels.cpu_dense import onednn_uses_amx
from tokenmill.kernels.cpu_quant import (
    dequantize_packed,
    load_cpu_quant,
    quant_linear,
)
from tokenmill.quant.packing import (
    BlockWeights,
    QuantizedTensor,
    cat_rows,
    pack_tiles,
)
from tokenmill.quant.unquantized import UnquantizedMethod

if TYPE_CHECKING:
    from tokenmill.layers.linear import Linear
    from tokenmill.quant.gpu_layout import GpuQuantWeight

logger = logging.getLogger(__name__)

# Above this many rows (a prompt chunk, a large batch) the weight is dequantized to bfloat16 for
# the call and multiplied densely: the int8 dot products cost more per row than oneDNN's bf16
# matmul once each weight is reused this often (measured crossover ~96 rows on the 2-core
# host: 64 rows 72 vs 91 ms, 128 rows 139 vs 100 ms, 512 rows 516 vs 196 ms for SmolLM2's
# decoder). Never in batch-invariant mode, where a row must not depend on the batch size.
# Only where oneDNN runs bfloat16 on AMX (see dense_above_rows).
DENSE_ABOVE_ROWS = 96


def dense_above_rows() -> int | None:
    """The row count above which default mode dequantizes (None: never). Without AMX,
    oneDNN's bfloat16 matmul runs vdpbf16ps, half the multiply-adds per instruction of the
    kernel's vpdpbusd, and the int8 kernel is faster at every row count (measured with oneDNN
    capped at AVX512_CORE_BF16 on the Xeon: 3x at 96 rows, 3-7x at 512 rows), so every row
    count takes the kernel and default mode computes what batch-invariant mode does."""
    return DENSE_ABOVE_ROWS if onednn_uses_amx() else None


@functools.cache
def _warn_no_triton() -> None:
    logger.warning("triton is not installed: quantized weights are dequantized at load on CUDA")


def _use_triton(device: torch.device) -> bool:
    """Whether a layer on `device` keeps its blocks for the Triton kernel (tests monkeypatch
    this to run the kernel under Triton's interpreter on CPU)."""
    if device.type != "cuda" or os.environ.get("TOKENMILL_NO_TRITON"):
        return False
    if importlib.util.find_spec("triton") is None:
        _warn_no_triton()
        return False
    return True


class BlockQuantMethod:
    def __init__(self) -> None:
        self.parts: dict[str | None, BlockWeights | torch.Tensor] = {}
        self.packed: torch.Tensor | None = None
        self.gpu_weight: GpuQuantWeight | None = None  # the Triton kernel's layout
        self.bits = 0
        self.format = ""

    def create_weights(self, layer: Linear) -> None:
        # A dense placeholder: dense tensors load into it (a fused layer may mix quantized and
        # dense shards), and it stays if no kernel takes the quantized ones.
        UnquantizedMethod().create_weights(layer)

    def load(
        self, layer: Linear, tensor: QuantizedTensor | BlockWeights, shard: str | None
    ) -> None:
        if not isinstance(tensor, QuantizedTensor | BlockWeights):
            raise ValueError(
                f"{layer}: a {type(tensor).__name__} arrived for a layer of block-quantized weights"
            )
        if isinstance(tensor, QuantizedTensor):
            self.format = self.format or tensor.qtype
            tensor = tensor.unpack()
        self.parts[shard] = tensor

    def process_after_loading(self, layer: Linear) -> None:
        order = getattr(layer, "shard_names", (None,))
        if None in self.parts:  # a fused layer's weight that arrived whole, as stored
            order = (None,)
        parts = [self.parts.get(s) for s in order]
        quantized = all(isinstance(p, BlockWeights) for p in parts)
        device = layer.weight.device
        on_cpu = device.type == "cpu"
        use_triton = quantized and _use_triton(device)
        if quantized and (use_triton or (on_cpu and load_cpu_quant() is not None)):
            bw = cat_rows(parts)  # type: ignore[arg-type]
            self.bits = bw.bits
            if use_triton:  # imported only here: the module imports triton
                from tokenmill.quant.gpu_layout import pack_for_gpu

                self.gpu_weight = pack_for_gpu(bw).to(device)
            else:
                self.packed = pack_tiles(bw)
            layer.weight_bytes = bw.nbytes()
            if "weight" in layer._parameters:
                del layer._parameters["weight"]  # the dense copy (a tied embedding keeps its own)
            self.parts.clear()
            return
        # Dense fallback: dequantize the quantized parts into the dense weight's rows (parts
        # that came dense were already copied there by the loader).
        if quantized and on_cpu:
            logger.warning("quantized CPU kernel unavailable: dequantizing %s", layer)
        weight = layer.weight.data
        for shard, part in zip(order, parts, strict=True):
            if isinstance(part, BlockWeights):
                start, end = layer.shard_offset(shard) if shard else (0, layer.out_features)
                weight[start:end] = part.dequantize().to(weight.device, weight.dtype)
        self.parts.clear()
        layer.quant_method = UnquantizedMethod()
        layer.quant_method.process_after_loading(layer)

    def describe(self, layer: Linear) -> str:
        return self.format or f"int{self.bits}"

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        if self.gpu_weight is not None:
            from tokenmill.kernels.triton_quant import quant_matmul

            y = quant_matmul(x, self.gpu_weight, layer.bias, batch_invariant=layer.batch_invariant)
            return y.to(layer.dtype)
        packed = self.packed
        assert packed is not None
        n, bits = layer.out_features, self.bits
        return kernel_or_dense(
            layer,
            x,
            dense_above_rows(),
            lambda x: quant_linear(x, packed, n, bits),
            lambda: dequantize_packed(packed, n, bits),
        )


def kernel_or_dense(
    layer: Linear,
    x: torch.Tensor,
    dense_above_rows: int | None,
    kernel: Callable[[torch.Tensor], torch.Tensor],
    dequantize: Callable[[], torch.Tensor],
) -> torch.Tensor:
    """A quantized layer's matmul: `kernel(x)` (float32 or bfloat16 x, y in x's dtype), or, for
    more than `dense_above_rows` (None: no limit) bfloat16 rows outside batch-invariant mode,
    oneDNN's bf16 matmul on the `dequantize()`d weight."""
    if (
        dense_above_rows is not None
        and x.dtype == torch.bfloat16
        and x.shape[0] > dense_above_rows
        and not layer.batch_invariant
    ):
        return F.linear(x, dequantize(), layer.bias)
    if x.dtype not in (torch.float32, torch.bfloat16):
        x = x.float()
    y = kernel(x)
    if layer.bias is not None:
        y = y + layer.bias
    return y.to(layer.dtype)
