"""Low-bit copies of experts, for the mixed-precision misses of expert offloading (HOBBIT's
token-level loading): a miss on an expert whose routing weight is small is served from a
resident low-bit copy instead of loading the expert. Lossy, and only used when asked for.

A copy is a SwiGLU of the expert's shape whose two linear layers hold the expert's weights
(dequantized where they are quantized) re-quantized round-to-nearest, asymmetric, one fp16
scale and offset per 32 weights along K:
- int4: the repository's block method (`quant.block`): the CPU kernel's packed tiles, or the
  Triton kernel's layout on CUDA; 5 bits a weight with the scales;
- int2: `quant.int2` (four weights a byte), dequantized for each call and multiplied densely
  (no 2-bit kernel); 3 bits a weight with the scales.
"""

from __future__ import annotations

import torch
from torch import nn

from tokenmill.layers.linear import Linear
from tokenmill.quant.int2 import Int2Method
from tokenmill.quant.packing import BLOCK, quantize_rtn, unpack_tiles

MISS_PRECISIONS = {"int4": 4, "int2": 2}


def dense_weight(layer: Linear) -> torch.Tensor:
    """The float32 weight [out, in] that `layer` multiplies by, on its device."""
    method = layer.quant_method
    gpu_weight = getattr(method, "gpu_weight", None)
    if gpu_weight is not None:
        from tokenmill.quant.gpu_layout import dequantize_gpu

        return dequantize_gpu(gpu_weight)
    packed = getattr(method, "packed", None)
    if packed is not None:
        return unpack_tiles(packed, layer.out_features, method.bits).dequantize()
    weight = layer._parameters.get("weight")
    if weight is None:
        raise ValueError(f"{layer}: no dense form of a {method.describe(layer)} weight")
    return weight.detach().float()


def _low_bit_linear(src: Linear, dst: Linear, bits: int) -> None:
    w = dense_weight(src).to(dst.weight.device)
    bw = quantize_rtn(w, bits, BLOCK)
    dst.batch_invariant = src.batch_invariant
    if bits == 2:
        method = Int2Method(bw)
        dst.quant_method = method
        del dst._parameters["weight"]
        dst.weight_bytes = method.nbytes()
        return
    dst.load_quantized(bw)  # the block method: packed for the CPU or Triton kernel
    dst.quant_method.process_after_loading(dst)


def low_bit_copy(expert: nn.Module, bits: int, device: torch.device) -> nn.Module:
    """A module of `expert`'s class (layers/moe.py's SwiGLU, built as it is: hidden, inter,
    dtype, quant scheme) on `device`, computing `expert` from `bits`-bit weights."""
    if bits not in MISS_PRECISIONS.values():
        raise ValueError(f"low-bit expert copies take 4 or 2 bits, got {bits}")
    hidden, inter = expert.gate_up_proj.in_features, expert.down_proj.in_features
    for lin in (expert.gate_up_proj, expert.down_proj):
        if lin.bias is not None or lin.in_features % BLOCK:
            raise ValueError(f"{lin}: a low-bit copy needs no bias and K a multiple of {BLOCK}")
    with torch.device(device):
        copy = type(expert)(hidden, inter, expert.down_proj.dtype, "blocks")
    with torch.no_grad():
        _low_bit_linear(expert.gate_up_proj, copy.gate_up_proj, bits)
        _low_bit_linear(expert.down_proj, copy.down_proj, bits)
    return copy


def copy_bytes(copy: nn.Module) -> int:
    """Bytes of weight a low-bit copy holds (its linear layers' packed blocks and scales)."""
    return sum(m.weight_bytes for m in copy.modules() if isinstance(m, Linear))
