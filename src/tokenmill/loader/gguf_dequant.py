"""GGUF tensor data to torch tensors: float formats converted, Q4_0/Q4_1/Q8_0 blocks
dequantized bit for bit as gguf.quants does."""

from __future__ import annotations

from collections.abc import Callable

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.gguf_reader import ReaderTensor

from tokenmill.errors import ModelLoadError

_CHUNK_BLOCKS = 1 << 16  # bounds the float32 temporaries of one dequantization step


def _half(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The fp16 scale stored at byte `start` of each block, as float32 of shape (n, 1)."""
    return blocks[:, start : start + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    # ggml packs element j in the low nibble and element j + 16 in the high nibble
    return torch.cat((qs & 0x0F, qs >> 4), dim=1)


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    return blocks[:, 2:].contiguous().view(torch.int8).float() * _half(blocks, 0)


def _q4_0(blocks: torch.Tensor) -> torch.Tensor:
    q = _nibbles(blocks[:, 2:]).to(torch.int8) - 8
    return _half(blocks, 0) * q.float()


def _q4_1(blocks: torch.Tensor) -> torch.Tensor:
    # two separate ops (no fused multiply-add) so results equal gguf.quants bit for bit
    return _half(blocks, 0) * _nibbles(blocks[:, 4:]).float() + _half(blocks, 2)


_BLOCK_KERNELS: dict[GGMLQuantizationType, Callable[[torch.Tensor], torch.Tensor]] = {
    GGMLQuantizationType.Q8_0: _q8_0,
    GGMLQuantizationType.Q4_0: _q4_0,
    GGMLQuantizationType.Q4_1: _q4_1,
}


def dequantize(t: ReaderTensor, dtype: torch.dtype) -> torch.Tensor:
    """Tensor `t` as `dtype`, in HF shape order (the reverse of GGUF's)."""
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    qtype = t.tensor_type
    data = torch.from_numpy(t.data)
    if qtype == GGMLQuantizationType.F32:
        return data.reshape(shape).to(dtype, copy=True)
    if qtype == GGMLQuantizationType.F16:
        return data.reshape(shape).float().to(dtype)
    if qtype == GGMLQuantizationType.BF16:
        return data.reshape(-1).view(torch.bfloat16).reshape(shape).float().to(dtype)
    kernel = _BLOCK_KERNELS.get(qtype)
    if kernel is None:
        supported = ", ".join(["F32", "F16", "BF16", *(k.name for k in _BLOCK_KERNELS)])
        raise ModelLoadError(
            f"tensor {t.name!r} has GGML type {qtype.name}, which is not supported "
            f"(supported: {supported})"
        )
    block, type_size = GGML_QUANT_SIZES[qtype]
    blocks = data.reshape(-1, type_size)
    out = torch.empty(blocks.shape[0], block, dtype=dtype)
    for start in range(0, blocks.shape[0], _CHUNK_BLOCKS):
        out[start : start + _CHUNK_BLOCKS] = kernel(blocks[start : start + _CHUNK_BLOCKS])
    return out.reshape(shape)
